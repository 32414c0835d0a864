"""Image loading and CLIP preprocessing (LLAVA.md §4), matching transformers' CLIPImageProcessor (PIL).

`square`: resize the shortest edge to `image_size` (bicubic), center crop, scale 1/255, normalize.
`pad` (LLaVA-1.5): first paste the image centered on a square canvas of the mean colour (122, 116, 104).
Every PIL mode is converted to RGB first; transparency is composited onto white, as transformers does.
"""
from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104), as the original
ASPECTS = ('square', 'pad')

_SCALE = (1.0 / (255.0 * np.asarray(CLIP_STD))).astype(np.float32)
_OFFSET = (np.asarray(CLIP_MEAN) / np.asarray(CLIP_STD)).astype(np.float32)


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB. Alpha (RGBA, LA, PA, palette transparency) is composited onto white;
  16/32-bit integer and float grayscale are scaled to 8 bits from their own range."""
  if img.mode == 'RGB':
    return img
  if 'A' in img.getbands() or img.info.get('transparency') is not None:
    rgba = img.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert('RGB')
  if img.mode in ('I', 'F') or img.mode.startswith('I;'):
    a = np.asarray(img, np.float64)
    top = 65535.0 if img.mode.startswith('I;16') or (a.size and a.max() > 255) else 255.0
    if img.mode == 'F' and a.size and a.max() <= 1.0:
      top = 1.0
    a = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(a, 'L').convert('RGB')
  return img.convert('RGB')


def load_image(src: Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]) -> Image.Image:
  """A path, encoded bytes or PIL image -> decoded RGB PIL image. Raises OSError/ValueError naming
  the path when the file is missing or cannot be decoded."""
  if isinstance(src, Image.Image):
    return to_rgb(src)
  if isinstance(src, (bytes, bytearray, memoryview)):
    if not len(src):
      raise ValueError('empty image bytes')
    with Image.open(io.BytesIO(bytes(src))) as img:
      img.load()
      return to_rgb(img)
  try:
    with Image.open(src) as img:
      img.load()
      return to_rgb(img)
  except (OSError, ValueError) as e:
    raise type(e)(f'{os.fspath(src)}: cannot load image ({e})') from e


def expand_to_square(img: Image.Image, fill=PAD_COLOR) -> Image.Image:
  """Pads to a square of side max(w, h), image centered (offset rounded down, as the original)."""
  w, h = img.size
  if w == h:
    return img
  side = max(w, h)
  canvas = Image.new(img.mode, (side, side), fill)
  canvas.paste(img, ((side - w) // 2, (side - h) // 2))
  return canvas


def resize_shortest_edge(img: Image.Image, size: int) -> Image.Image:
  """Bicubic resize so the shortest edge is `size`; the long edge is int(size * long / short)."""
  w, h = img.size
  if w <= h:
    new = (size, int(size * h / w))
  else:
    new = (int(size * w / h), size)
  return img if new == (w, h) else img.resize(new, Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
  w, h = img.size
  if w < size or h < size:
    raise ValueError(f'image {w}x{h} is smaller than the crop {size}')
  left, top = (w - size) // 2, (h - size) // 2
  return img.crop((left, top, left + size, top + size))


def normalize(img: Image.Image) -> np.ndarray:
  """uint8 RGB -> float32 [H, W, 3], (x / 255 - mean) / std."""
  return np.asarray(img, np.float32) * _SCALE - _OFFSET


def preprocess_image(img: Image.Image, image_size: int, aspect: str = 'square') -> np.ndarray:
  """PIL image (any mode) -> float32 [image_size, image_size, 3] normalized with CLIP mean/std."""
  if aspect not in ASPECTS:
    raise ValueError(f'image aspect must be one of {ASPECTS}, got {aspect!r}')
  img = to_rgb(img)
  if aspect == 'pad':
    img = expand_to_square(img)
  return normalize(center_crop(resize_shortest_edge(img, image_size), image_size))


def blank_image(image_size: int) -> np.ndarray:
  """The zero image of a text-only sample, float32 [image_size, image_size, 3]."""
  return np.zeros((image_size, image_size, 3), np.float32)
