"""COCO annotations -> the symbolic image context a text-only model reads (paper section 3).

Context of one image: its captions, one per line, then a blank line, then one line per object box
`category: [x1, y1, x2, y2]` with corners normalized by the image size to 0..1 (3 decimals).
Input is standard COCO: `images` (id, file_name, width, height), `annotations` (image_id + caption in
the captions file; image_id + bbox [x, y, w, h] in pixels + category_id in the instances file),
`categories` (id, name).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ImageContext:
  image_id: int
  file_name: str
  captions: tuple
  boxes: tuple  # ((category, (x1, y1, x2, y2)), ...) normalized to 0..1

  def render(self) -> str:
    lines = list(self.captions)
    if self.boxes:
      lines.append('')
      lines += [format_box(c, b) for c, b in self.boxes]
    return '\n'.join(lines)


def format_box(category: str, box) -> str:
  return f'{category}: [' + ', '.join(f'{v:.3f}' for v in box) + ']'


def normalize_box(bbox, width: float, height: float) -> tuple:
  """COCO [x, y, w, h] in pixels -> (x1, y1, x2, y2) in 0..1, rounded to 3 decimals."""
  x, y, w, h = (float(v) for v in bbox)
  clip = lambda v: min(1.0, max(0.0, v))
  return (round(clip(x / width), 3), round(clip(y / height), 3),
          round(clip((x + w) / width), 3), round(clip((y + h) / height), 3))


def _read(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f'COCO annotation file not found: {path}') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None
  for key in ('images', 'annotations'):
    if not isinstance(data.get(key), list):
      raise ValueError(f'{path}: missing list {key!r}; expected COCO format')
  return data


def _field(path, kind, index, record, key):
  if key not in record:
    raise ValueError(f'{path}: {kind}[{index}] has no {key!r}')
  return record[key]


@dataclasses.dataclass
class ContextStats:
  images: int = 0
  no_caption: int = 0   # images skipped: nothing to describe from
  bad_boxes: int = 0    # boxes with zero/negative size or unknown category, dropped


def load_coco_contexts(captions_path: str, instances_path: Optional[str] = None
                       ) -> tuple[list[ImageContext], ContextStats]:
  """Per-image contexts sorted by image id; images without captions are skipped and counted."""
  stats = ContextStats()
  caps = _read(captions_path)
  images = {}
  for i, im in enumerate(caps['images']):
    images[_field(captions_path, 'images', i, im, 'id')] = im
  captions = {}
  for i, ann in enumerate(caps['annotations']):
    image_id = _field(captions_path, 'annotations', i, ann, 'image_id')
    text = ' '.join(str(_field(captions_path, 'annotations', i, ann, 'caption')).split())
    if image_id not in images:
      raise ValueError(f'{captions_path}: annotations[{i}] refers to unknown image_id {image_id}')
    if text:
      captions.setdefault(image_id, []).append(text)

  boxes = {}
  if instances_path:
    inst = _read(instances_path)
    for i, im in enumerate(inst['images']):
      images.setdefault(_field(instances_path, 'images', i, im, 'id'), im)
    categories = {c['id']: c['name'] for c in inst.get('categories', [])}
    for i, ann in enumerate(inst['annotations']):
      image_id = _field(instances_path, 'annotations', i, ann, 'image_id')
      bbox = _field(instances_path, 'annotations', i, ann, 'bbox')
      category = categories.get(_field(instances_path, 'annotations', i, ann, 'category_id'))
      if image_id not in images:
        raise ValueError(f'{instances_path}: annotations[{i}] refers to unknown image_id {image_id}')
      if category is None or len(bbox) != 4 or bbox[2] <= 0 or bbox[3] <= 0:
        stats.bad_boxes += 1
        continue
      boxes.setdefault(image_id, []).append((category, bbox))

  contexts = []
  for image_id in sorted(images):
    im = images[image_id]
    stats.images += 1
    if image_id not in captions:
      stats.no_caption += 1
      continue
    image_boxes = []
    for category, bbox in boxes.get(image_id, []):
      for key in ('width', 'height'):
        if not im.get(key):
          raise ValueError(f'image {image_id} ({im.get("file_name")}) has no {key!r}; needed to normalize boxes')
      image_boxes.append((category, normalize_box(bbox, im['width'], im['height'])))
    contexts.append(ImageContext(image_id=image_id, file_name=str(im.get('file_name', f'{image_id}.jpg')),
                                 captions=tuple(captions[image_id]), boxes=tuple(image_boxes)))
  return contexts, stats
