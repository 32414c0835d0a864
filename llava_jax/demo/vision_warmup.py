"""The vision warm-up of the demo (configs/demo.py, its `vision_warmup` section): `<workdir>/vision_warmup/model`.

LLaVA starts from a pretrained CLIP, which cannot be downloaded here. The tiny ViT is pretrained instead on the
dataset's COCO boxes, like a detection backbone: linear heads on its feature-layer output name, for every patch,
the colour, the shape and the colour + shape of the object whose box centre lies in it (or "none"). Only the ViT
is kept; the heads are dropped. Trained through the LLM on captions alone, the tiny ViT learns colour in minutes
but shape only now and then.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np

from llava_jax.demo.data import data_dir, write_json

LABEL_KINDS = ('colour', 'shape', 'object')  # the per-patch labels, one linear head each


def patch_labels(instances_file: str, image_size: int, patch_size: int) -> tuple[list[str], dict[str, np.ndarray]]:
  """COCO instances (categories named 'colour shape') -> image files and per-patch labels, 0 = no object.

  Returns (file names, {'colour': [N, P], 'shape': [N, P], 'object': [N, P]} int32), P = patches in row-major order;
  an object belongs to the patch holding its box centre.
  """
  with open(instances_file) as f:
    coco = json.load(f)
  names = {c['id']: c['name'].split() for c in coco['categories']}
  if any(len(n) != 2 for n in names.values()):
    raise ValueError(f'{instances_file}: categories must be named "colour shape", got {sorted(names.values())}')
  colours = sorted({n[0] for n in names.values()})
  shapes = sorted({n[1] for n in names.values()})
  grid = image_size // patch_size
  row_of = {im['id']: i for i, im in enumerate(coco['images'])}
  for im in coco['images']:
    if (im['width'], im['height']) != (image_size, image_size):
      raise ValueError(f'{instances_file}: {im["file_name"]} is {im["width"]}x{im["height"]}, the model takes '
                       f'{image_size}x{image_size}')
  labels = {k: np.zeros((len(row_of), grid * grid), np.int32) for k in LABEL_KINDS}
  for a in coco['annotations']:
    x, y, w, h = a['bbox']
    patch = int((y + h / 2) // patch_size) * grid + int((x + w / 2) // patch_size)
    colour, shape = names[a['category_id']]
    row = row_of[a['image_id']]
    labels['colour'][row, patch] = colours.index(colour) + 1
    labels['shape'][row, patch] = shapes.index(shape) + 1
    labels['object'][row, patch] = a['category_id']
  return [im['file_name'] for im in coco['images']], labels


def _load_split(root: str, split: str, image_size: int, patch_size: int):
  from llava_jax.data.image import load_image, preprocess_image
  files, labels = patch_labels(os.path.join(root, 'annotations', f'instances_{split}.json'), image_size, patch_size)
  pixels = np.stack([preprocess_image(load_image(os.path.join(root, 'images', f)), image_size) for f in files])
  return pixels, labels


def train(cfg, model_config, workdir: str, log: Callable[[str], None] = print) -> str:
  """Pretrain the vision tower on the demo's boxes (see the module docstring); returns the exported model dir.

  `cfg`: the config's `vision_warmup` section; `model_config`: the LlavaConfig of the stages that load it. Skipped
  when the export exists. Every process computes the same result (it is small); orbax writes it once.
  """
  import flax.linen as nn
  import optax

  from llava_jax import model_dir
  from llava_jax.models.clip import CLIPVisionTower
  from llava_jax.models.llava import init_params
  from llava_jax.train.optim import lr_schedule

  out = os.path.join(workdir, 'vision_warmup', 'model')
  if model_dir.is_model_dir(out):
    log(f'vision warm-up: {out} exists; nothing to do')
    return out
  v = model_config.vision
  root = data_dir(workdir)
  pixels, labels = _load_split(root, 'train', v.image_size, v.patch_size)
  heads = tuple(int(labels[k].max()) + 1 for k in LABEL_KINDS)

  class Tower(nn.Module):  # the tower + one linear head per label kind, per patch
    @nn.compact
    def __call__(self, x):
      f = CLIPVisionTower(v, name='vision_tower')(x)
      if v.feature_select == 'cls_patch':
        f = f[:, 1:]
      return tuple(nn.Dense(n, name=f'head_{i}')(f) for i, n in enumerate(heads))

  model = Tower()
  params = nn.meta.unbox(model.init(jax.random.key(cfg.seed), pixels[:1])['params'])
  tx = optax.adamw(lr_schedule(cfg.lr, cfg.steps, 0.05, 'cosine'), weight_decay=0.0)

  def loss_fn(p, x, ys):
    logits = model.apply({'params': p}, x)
    return sum(optax.softmax_cross_entropy_with_integer_labels(lg, y).mean() for lg, y in zip(logits, ys))

  @jax.jit
  def step(p, opt, x, ys):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, ys)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss

  def accuracy(p, x, ys) -> list[float]:
    """Per head: correct patches with an object / patches with an object."""
    predict = jax.jit(lambda p, x: [lg.argmax(-1) for lg in model.apply({'params': p}, x)])
    hits = [np.zeros(2) for _ in heads]
    for i in range(0, len(x), 256):
      for h, pred, y in zip(hits, predict(p, x[i:i + 256]), ys):
        y = y[i:i + 256]
        h += [((np.asarray(pred) == y) & (y > 0)).sum(), (y > 0).sum()]
    return [float(a / max(1, b)) for a, b in hits]

  log(f'vision warm-up: {len(pixels)} images, {cfg.steps} steps of {cfg.batch_size}, heads colour/shape/object '
      f'{heads} classes per patch')
  ys_all = tuple(labels[k] for k in LABEL_KINDS)
  opt = tx.init(params)
  rng = np.random.default_rng(cfg.seed)
  losses = []
  for i in range(cfg.steps):
    idx = rng.integers(0, len(pixels), cfg.batch_size)
    params, opt, loss = step(params, opt, pixels[idx], tuple(y[idx] for y in ys_all))
    losses.append(loss)
    if (i + 1) % max(1, cfg.steps // 5) == 0 or i + 1 == cfg.steps:
      log(f'vision warm-up: step {i + 1}/{cfg.steps} loss {float(loss):.4f}')
  held_out, held_out_labels = _load_split(root, 'qa', v.image_size, v.patch_size)
  acc = accuracy(params, held_out, tuple(held_out_labels[k] for k in LABEL_KINDS))
  log('vision warm-up: held-out patch accuracy colour {:.4f}, shape {:.4f}, object {:.4f}'.format(*acc))
  full = jax.device_get(init_params(model_config, jax.random.key(cfg.seed)))
  full['vision_tower'] = jax.device_get(params['vision_tower'])
  model_dir.save_model(out, model_config, full)
  if jax.process_index() == 0:
    losses = [float(x) for x in jax.device_get(losses)]
    write_json({'held_out_patch_accuracy': dict(zip(LABEL_KINDS, acc)), 'steps': cfg.steps,
                'first_loss': losses[0], 'last_loss': losses[-1]},
               os.path.join(workdir, 'vision_warmup', 'metrics.json'))
  return out
