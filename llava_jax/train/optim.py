"""AdamW over the trainable params only: cosine schedule with linear warmup, global-norm clipping, weight decay on
matrices only (norms and biases excluded), an optional separate projector learning rate.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import optax

from llava_jax.train import partition


def lr_schedule(peak: float, total_steps: int, warmup_ratio: float, kind: str) -> Callable:
  """HF-style schedule: linear warmup from 0 over ceil(ratio * total) steps, then cosine to 0 (or constant)."""
  warmup = math.ceil(warmup_ratio * total_steps)
  if kind == 'constant':
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                [warmup]) if warmup else optax.constant_schedule(peak)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), 0.0)


def _is_projector(path: str) -> bool:
  return path.startswith('projector' + partition.SEP)


def make_optimizer(optim, total_steps: int, trainable) -> tuple[optax.GradientTransformation, Callable]:
  """optim: the config's `optim` section. Returns (tx, main lr schedule). State exists for `trainable` leaves only."""
  def adamw(lr):
    # Decay matrices only: biases, norm scales and the CLIP class embedding (all 1-D) are excluded.
    return optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                       mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))

  main = lr_schedule(optim.lr, total_steps, optim.warmup_ratio, optim.schedule)
  if optim.projector_lr is None:
    tx = adamw(main)
  else:
    proj = lr_schedule(optim.projector_lr, total_steps, optim.warmup_ratio, optim.schedule)
    labels = partition.unflatten({k: 'projector' if _is_projector(k) else 'rest'
                                  for k in partition.flatten(trainable)})
    tx = optax.multi_transform({'projector': adamw(proj), 'rest': adamw(main)}, labels)
  if optim.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), tx)
  return tx, main
