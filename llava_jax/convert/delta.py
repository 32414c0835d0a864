"""Delta weights, as the original release distributed LLaVA-v0/v1 (`llava.model.apply_delta` / `make_delta`).

  python -m llava_jax.convert apply-delta --base LLAMA_DIR --delta DELTA_DIR OUT   # OUT = base + delta
  python -m llava_jax.convert make-delta --base LLAMA_DIR --target LLAVA_DIR OUT   # OUT = target - base

Tensor by tensor: every name and shape is checked before anything is written (one error naming both files and
the tensor), then each output tensor is read, summed and written on its own, so peak memory is a few tensors,
never a model. Like the original:
  - a delta tensor the base lacks (`model.mm_projector.*`, a vision tower) is LLaVA's own and is copied as is;
  - `model.embed_tokens.weight` and `lm_head.weight` may have more rows in the delta (tokens LLaVA added): the
    base is added to the first rows only; any other shape difference is an error;
  - the delta dir's other files (config.json, tokenizer) are copied beside the weights.
Sums are computed in float64 and rounded once to the output dtype, which for float16 tensors is exactly the
original's float16 `param += base`. apply-delta writes the base's dtype by default; make-delta writes float32
(`--dtype`), wide enough that applying it gives back a float16 / bfloat16 target bit for bit, and checks that
(it stops, naming the tensors, when a narrower --dtype would not).
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Optional

import numpy as np

from llava_jax.convert.safetensors_io import (BIN_INDEX, SAFE_INDEX, TensorOut, TensorRef, open_checkpoint,
                                              write_safetensors)

GROWABLE = ('model.embed_tokens.weight', 'lm_head.weight')  # rows added with LLaVA's tokens
DTYPES = ('float16', 'bfloat16', 'float32')
Log = Callable[[str], None]


class DeltaMismatchError(ValueError):
  """The delta does not fit its base (or the target its base)."""


def _np_dtype(name: str) -> np.dtype:
  import ml_dtypes
  return np.dtype(ml_dtypes.bfloat16) if name == 'bfloat16' else np.dtype(name)


def check_fit(base: dict[str, TensorRef], other: dict[str, TensorRef], what: str) -> tuple[list, list]:
  """Names of `other` (the delta or the target) that pair with a base tensor, and those that are LLaVA's own.
  Raises DeltaMismatchError listing every tensor whose shape does not fit."""
  paired, own, bad = [], [], []
  for name, ref in other.items():
    if name not in base:
      own.append(name)
      continue
    b = base[name]
    if tuple(ref.shape) == tuple(b.shape):
      paired.append(name)
    elif (name in GROWABLE and len(ref.shape) == len(b.shape) == 2 and ref.shape[1] == b.shape[1]
          and ref.shape[0] > b.shape[0]):
      paired.append(name)
    else:
      bad.append(f'tensor {name}: {ref.source} has shape {tuple(ref.shape)}, {b.source} has {tuple(b.shape)}')
  if bad:
    rule = f'shapes must match, except that {" / ".join(GROWABLE)} may have more rows in the {what}'
    raise DeltaMismatchError(f'the {what} does not fit its base ({rule}):\n  ' + '\n  '.join(bad))
  return paired, own


def _combine(a: np.ndarray, base: np.ndarray, sign: int, dtype: np.dtype) -> np.ndarray:
  """a + sign * base over base's rows, in float64, rounded once to `dtype`."""
  out = np.asarray(a, np.float64).copy()
  rows = base.shape[0]
  out[:rows] += sign * np.asarray(base, np.float64)
  return out.astype(dtype)


def _copy_side_files(src: str, out: str) -> list[str]:
  """Everything in `src` except weights (config.json, generation_config.json, tokenizer files)."""
  copied = []
  for name in sorted(os.listdir(src)):
    path = os.path.join(src, name)
    if (os.path.isfile(path) and not name.endswith(('.safetensors', '.bin', '.pt', '.pth'))
        and name not in (SAFE_INDEX, BIN_INDEX)):
      shutil.copy2(path, os.path.join(out, name))
      copied.append(name)
  return copied


def _run(base_dir: str, other_dir: str, out_dir: str, sign: int, what: str, dtype: Optional[str],
         max_shard_bytes: int, log: Log, check: Optional[dict] = None) -> dict:
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r}; allowed: {DTYPES}')
  base, other = open_checkpoint(base_dir), open_checkpoint(other_dir)
  paired, own = check_fit(base, other, what)
  if dtype is None:  # apply-delta: the base model's precision (a delta may be stored wider)
    ref = base.get(GROWABLE[0]) or next(iter(base.values()))
    dtype = 'bfloat16' if ref.dtype == _np_dtype('bfloat16') else str(ref.dtype)
  log(f'{len(paired)} tensors to combine, {len(own)} of LLaVA\'s own copied as is'
      + (f' ({", ".join(own[:4])}{" ..." if len(own) > 4 else ""})' if own else ''))
  ignored = sorted(set(base) - set(other))
  if ignored:
    log(f'{len(ignored)} base tensors the {what} does not have are ignored, e.g. {ignored[:3]}')
  stats = {'combined': len(paired), 'copied': len(own), 'not_bitwise': {}}
  done = [0]

  def produce(name: str):
    ref = other[name]
    out_dtype = _np_dtype(dtype)
    value = ref.load()
    if name in own:
      result = value.astype(out_dtype)
    else:
      b = base[name].load()
      result = _combine(value, b, sign, out_dtype)
      if check is not None:  # make-delta: does base + delta give the target back exactly?
        back = _combine(result, b, +1, value.dtype)
        bits = np.dtype(f'u{value.dtype.itemsize}')
        n = int(np.sum(back.view(bits) != value.view(bits)))
        if n:
          check[name] = n
    done[0] += 1
    if done[0] % 50 == 0 or done[0] == len(other):
      log(f'  {done[0]}/{len(other)} tensors')
    return result

  tensors = [TensorOut(name, tuple(ref.shape), _np_dtype(dtype), lambda name=name: produce(name))
             for name, ref in other.items()]
  os.makedirs(out_dir, exist_ok=True)
  write_safetensors(out_dir, tensors, max_shard_bytes, log=log)
  copied = _copy_side_files(other_dir, out_dir)
  log(f'copied {", ".join(copied) or "no other files"} from {other_dir}')
  return stats


def apply_delta(base_dir: str, delta_dir: str, out_dir: str, *, dtype: Optional[str] = None,
                max_shard_bytes: int = 5 * 2**30, log: Log = lambda s: None) -> dict:
  """OUT = base + delta (HF checkpoint dirs). dtype: of the written tensors (default: the base's)."""
  return _run(base_dir, delta_dir, out_dir, +1, 'delta', dtype, max_shard_bytes, log)


def make_delta(base_dir: str, target_dir: str, out_dir: str, *, dtype: Optional[str] = 'float32',
               max_shard_bytes: int = 5 * 2**30, log: Log = lambda s: None) -> dict:
  """OUT = target - base. Returns stats; stats['not_bitwise'] = {tensor: elements that base + delta would not
  give back exactly} (empty when the delta dtype is wide enough)."""
  check: dict = {}
  stats = _run(base_dir, target_dir, out_dir, -1, 'target', dtype, max_shard_bytes, log, check)
  stats['not_bitwise'] = check
  if check:
    log(f'warning: {len(check)} tensors would not round-trip bit for bit in {dtype} (e.g. {next(iter(check))}); '
        'use --dtype float32')
  return stats
