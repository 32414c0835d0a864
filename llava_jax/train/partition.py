"""Which params train: stage masks as data, and the split of the param tree into trainable and frozen parts.

A mask is a list of `(regex, trainable)` rules matched against '/'-joined param paths such as
`language_model/layers/q_proj/kernel`; the first rule that matches (`re.fullmatch`) decides. Stage 1 of the paper
is `(('projector/.*', True), ('.*', False))`.

Frozen params are never differentiated and get no optimizer state: the train step takes
`grad(loss)(trainable, frozen, ...)` w.r.t. `trainable` only.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util

from llava_jax.models import lora as lora_lib

Rules = Sequence[tuple[str, bool]]
SEP = '/'


def flatten(tree) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep=SEP)


def unflatten(flat: dict[str, Any]):
  return traverse_util.unflatten_dict(flat, sep=SEP)


def trainable_paths(params, rules: Rules) -> dict[str, bool]:
  """'/'-path -> trainable, for every leaf of `params`. Every leaf must match some rule."""
  out = {path: is_trainable(path, rules) for path in flatten(params)}
  unmatched = [p for p, t in out.items() if t is None]
  if unmatched:
    raise ValueError(f'param {unmatched[0]!r} matches no rule of train.trainable {list(rules)}; end the list with '
                     "('.*', False) to freeze everything else")
  return out


def is_trainable(path: str, rules: Rules):
  """The first rule matching '/'-path `path` decides: True / False, None when no rule matches."""
  return next((bool(t) for r, t in rules if re.fullmatch(r, path)), None)


def split(params, mask: dict[str, bool]):
  """-> (trainable, frozen) nested dicts holding the same leaves (either may be empty {})."""
  flat = flatten(params)
  trainable = unflatten({k: v for k, v in flat.items() if mask[k]})
  frozen = unflatten({k: v for k, v in flat.items() if not mask[k]})
  return trainable, frozen


def merge(trainable, frozen):
  """Inverse of `split`: one nested param dict."""
  return unflatten({**flatten(frozen), **flatten(trainable)})


def _nbytes(x) -> int:
  """Bytes of an array, or of every array inside a pytree leaf such as a qwix.QArray (quantized values + scales)."""
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(x)))


def param_table(trainable, frozen, opt_state_bytes: int, depth: int = 2) -> str:
  """Trainable / frozen parameter counts per module (first `depth` path parts) and bytes of params + optimizer."""
  rows: dict[str, list[int]] = {}
  for tree, col in ((trainable, 0), (frozen, 1)):
    for path, leaf in flatten(tree).items():
      key = SEP.join(path.split(SEP)[:depth])
      r = rows.setdefault(key, [0, 0, 0])
      r[col] += lora_lib.num_elements(leaf)
      r[2] += _nbytes(leaf)
  width = max([len(k) for k in rows] + [6])
  lines = [f'{"module":<{width}} {"trainable":>14} {"frozen":>14} {"param bytes":>12}']
  tot = [0, 0, 0]
  for key in sorted(rows):
    r = rows[key]
    tot = [a + b for a, b in zip(tot, r)]
    lines.append(f'{key:<{width}} {r[0]:>14,} {r[1]:>14,} {_fmt_bytes(r[2]):>12}')
  lines.append(f'{"total":<{width}} {tot[0]:>14,} {tot[1]:>14,} {_fmt_bytes(tot[2]):>12}')
  lines.append(f'optimizer state: {_fmt_bytes(opt_state_bytes)} (only trainable params have any)')
  return '\n'.join(lines)


def tree_bytes(tree) -> int:
  return sum(_nbytes(x) for x in jax.tree.leaves(tree) if hasattr(x, 'shape'))


def _fmt_bytes(n: int) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if n < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024
  return str(n)
