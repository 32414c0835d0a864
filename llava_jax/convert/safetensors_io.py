"""Reading and writing HF weight files one tensor at a time.

Reading: safetensors (single file, or sharded with `model.safetensors.index.json`) through `safetensors.safe_open`;
each tensor is read into its own buffer only when asked for, so an import never maps or holds a whole checkpoint.
`.bin` files are read only through `torch.load(weights_only=True)` (never plain pickle) and only when torch is
installed.
Writing: safetensors shards are planned from shapes first and then filled tensor by tensor. This writer stays ours:
`safetensors.numpy.save_file` takes a whole shard as arrays at once, where ours produces one tensor at a time
(bench/convert_memory.py, 1.11B-param bf16 LLaVA, 2.22 GB, 2026-12-03: export-hf peak RSS 4.24 GB with ours,
5.30 GB with save_file per shard).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Callable, Iterable, Optional

import ml_dtypes
import numpy as np
import safetensors

SAFE_INDEX = 'model.safetensors.index.json'
BIN_INDEX = 'pytorch_model.bin.index.json'

_DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclasses.dataclass
class TensorRef:
  """A tensor in a checkpoint, loaded on demand with `load()` -> np.ndarray."""
  name: str
  shape: tuple
  dtype: np.dtype
  source: str  # file it comes from (for error messages)
  load: Callable[[], np.ndarray]


def read_safetensors(path: str) -> dict[str, TensorRef]:
  """The tensors of one safetensors file; each is read into its own array when loaded (bf16 as ml_dtypes)."""
  # backend='pread': the default 'mmap' keeps every page it touched resident while the file stays open, and the
  # refs stay open for the whole import (24 bf16 tensors, 0.81 GB, read and dropped one by one: RSS +0.81 GB
  # with mmap, +0.00 GB with pread).
  try:
    f = safetensors.safe_open(path, framework='numpy', backend='pread')
  except safetensors.SafetensorError as e:
    raise ValueError(f'{path}: not a readable safetensors file ({e})') from None
  refs = {}
  for name in f.keys():
    info = f.get_slice(name)
    if info.get_dtype() not in _DTYPES:
      raise ValueError(f'{path}: tensor {name} has unsupported dtype {info.get_dtype()}')
    refs[name] = TensorRef(name, tuple(info.get_shape()), _DTYPES[info.get_dtype()], path,
                           lambda name=name: f.get_tensor(name))
  return refs


def _torch_to_numpy(t) -> np.ndarray:
  import torch
  t = t.detach().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def read_torch_bin(path: str) -> dict[str, TensorRef]:
  """A PyTorch `.bin` state dict via torch.load(weights_only=True) (safe loader; memory-mapped)."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'{path} is a PyTorch .bin file; reading it needs torch installed (or convert the '
                      'checkpoint to safetensors)') from e
  try:
    state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
  except RuntimeError:  # pre-1.6 (non-zip) serialization cannot be memory-mapped
    state = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(state, dict):
    raise ValueError(f'{path}: expected a state dict, got {type(state).__name__}')
  refs = {}
  for name, t in state.items():
    if not isinstance(t, torch.Tensor):
      raise ValueError(f'{path}: entry {name} is a {type(t).__name__}, not a tensor')
    dtype = _torch_to_numpy(torch.empty((0,), dtype=t.dtype)).dtype
    refs[name] = TensorRef(name, tuple(t.shape), dtype, path, lambda t=t: _torch_to_numpy(t).copy())
  return refs


def read_file(path: str) -> dict[str, TensorRef]:
  if path.endswith('.safetensors'):
    return read_safetensors(path)
  if path.endswith(('.bin', '.pt', '.pth')):
    return read_torch_bin(path)
  raise ValueError(f'{path}: unknown weight file type (expected .safetensors or .bin)')


def _merge(parts: Iterable[dict[str, TensorRef]]) -> dict[str, TensorRef]:
  out: dict[str, TensorRef] = {}
  for part in parts:
    for name, ref in part.items():
      if name in out:
        raise ValueError(f'tensor {name} appears in both {out[name].source} and {ref.source}')
      out[name] = ref
  return out


def open_checkpoint(path: str) -> dict[str, TensorRef]:
  """All tensors of an HF checkpoint directory (or a single weight file), keyed by their stored names.

  Order of preference in a directory: `model.safetensors.index.json`, `model.safetensors`,
  `pytorch_model.bin.index.json`, `pytorch_model.bin`.
  """
  if os.path.isfile(path):
    return read_file(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint path {path} does not exist')
  for index in (SAFE_INDEX, BIN_INDEX):
    index_path = os.path.join(path, index)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)['weight_map']
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
      if missing:
        raise FileNotFoundError(f'{index_path} names shard files that are missing: {missing}')
      refs = _merge(read_file(os.path.join(path, f)) for f in files)
      unlisted = sorted(set(weight_map) - set(refs))
      if unlisted:
        raise ValueError(f'{index_path} lists tensors absent from its shards: {unlisted[:10]}')
      return refs
  for single in ('model.safetensors', 'pytorch_model.bin'):
    if os.path.isfile(os.path.join(path, single)):
      return read_file(os.path.join(path, single))
  raise FileNotFoundError(f'{path} has no model.safetensors, {SAFE_INDEX}, pytorch_model.bin or {BIN_INDEX} '
                          f'(found: {sorted(os.listdir(path))[:20]})')


def from_arrays(arrays: dict[str, np.ndarray], source: str = '<memory>') -> dict[str, TensorRef]:
  """TensorRefs over in-memory arrays (e.g. a torch state dict turned into numpy)."""
  return {k: TensorRef(k, tuple(v.shape), np.dtype(v.dtype), source, lambda v=v: np.asarray(v))
          for k, v in arrays.items()}


# ----------------------------------------------------------------------------------------------------------------
# Writing


@dataclasses.dataclass
class TensorOut:
  """A tensor to write: `produce()` is called once, when its bytes are written."""
  name: str
  shape: tuple
  dtype: np.dtype
  produce: Callable[[], np.ndarray]


def write_one(path: str, tensors: list[TensorOut], metadata: dict) -> None:
  header, offset = {'__metadata__': metadata}, 0
  for t in tensors:
    if t.dtype not in _NAMES:
      raise ValueError(f'cannot write tensor {t.name}: dtype {t.dtype} has no safetensors name')
    n = math.prod(t.shape) * t.dtype.itemsize
    header[t.name] = {'dtype': _NAMES[t.dtype], 'shape': list(t.shape), 'data_offsets': [offset, offset + n]}
    offset += n
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # the data section starts 8-byte aligned
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for t in tensors:
      arr = np.ascontiguousarray(t.produce(), dtype=t.dtype)
      if arr.shape != tuple(t.shape):
        raise ValueError(f'tensor {t.name}: produced shape {arr.shape}, planned {tuple(t.shape)}')
      f.write(arr.reshape(-1).view(np.uint8).data)


def write_safetensors(out_dir: str, tensors: list[TensorOut], max_shard_bytes: int = 5 * 2**30,
                      metadata: Optional[dict] = None, log: Callable[[str], None] = lambda s: None) -> list[str]:
  """Write `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards plus the index. Returns file names."""
  metadata = dict(metadata or {'format': 'pt'})
  names = [t.name for t in tensors]
  if len(set(names)) != len(names):
    raise ValueError(f'duplicate tensor names: {sorted({n for n in names if names.count(n) > 1})}')
  shards: list[list[TensorOut]] = [[]]
  size = 0
  for t in tensors:
    n = math.prod(t.shape) * t.dtype.itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += n
  os.makedirs(out_dir, exist_ok=True)
  if len(shards) == 1:
    names = ['model.safetensors']
  else:
    names = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  for name, shard in zip(names, shards):
    log(f'writing {name} ({len(shard)} tensors)')
    write_one(os.path.join(out_dir, name), shard, metadata)
  if len(shards) > 1:
    total = sum(math.prod(t.shape) * t.dtype.itemsize for t in tensors)
    index = {'metadata': {'total_size': total},
             'weight_map': {t.name: name for name, shard in zip(names, shards) for t in shard}}
    with open(os.path.join(out_dir, SAFE_INDEX), 'w') as f:
      json.dump(index, f, indent=2)
  return names
