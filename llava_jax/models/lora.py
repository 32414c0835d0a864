"""LoRA (Hu et al., 2021) on the decoder's Dense layers, and frozen base kernels stored quantized (QLoRA).

A targeted Dense computes `y = x W + (alpha / r) * (dropout(x) A) B` with A [*in, r], B [r, *out], as peft's
`lora.Linear` does (A ~ U(+-1/sqrt(fan_in)), its kaiming-uniform default; B = 0, so at init the output is the
base model's exactly). The factors are a flax collection of their own, `lora`, created at init by every Dense
whose kernel path matches `LoraSpec.targets`; our param tree holds them under `params['lora']`, mirroring the
module paths (`lora/language_model/layers/q_proj/{a,b}`). Without that collection a Dense is the plain layer.

QLoRA: a frozen base kernel may be stored as a `qwix.QArray` (int8, or 4-bit NormalFloat as bitsandbytes' nf4) with
blockwise scales along its input dim; Dense dequantizes it one layer at a time. Of qwix only the array API
(`qwix.quantize` / `qwix.dequantize`) is used. Its model-level providers (`PtqProvider`, `LoraProvider`) intercept
`lax.dot_general` inside a module and find the weight by matching the operand against the module's own `params`
(`flax_util.find_param`); they keep the LoRA factors inside `params` next to the kernel, draw dropout from the
module's rng and hold quantized weights as `WithAux` objects that our Dense's cast and 2-D reshape of the kernel
do not pass through. That puts the factors and the frozen base in one collection, where the train step's physical
trainable/frozen split (train/partition.py) wants two.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import qwix

COLLECTION = 'lora'
# Blockwise scales: one per BLOCK inputs of an output channel (bitsandbytes' nf4 blocksize is 64 too).
BLOCK = 64
QTYPES = {8: jnp.int8, 4: 'nf4'}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """rank r, alpha (the update is scaled by alpha / r), dropout on the LoRA input, targets: a regex that the
  '/'-joined kernel path (`language_model/layers/q_proj/kernel`) must fullmatch."""
  rank: int
  alpha: float
  dropout: float
  targets: str

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def targets_module(self, module_path: tuple) -> bool:
    return re.fullmatch(self.targets, '/'.join(module_path) + '/kernel') is not None


def variables(params) -> dict[str, Any]:
  """Our param tree (factors under `params['lora']`) -> flax variables {'params', 'lora'}."""
  if COLLECTION not in params:
    return {'params': params}
  return {'params': {k: v for k, v in params.items() if k != COLLECTION}, COLLECTION: params[COLLECTION]}


def kernel_dims(kernel_shape, a_shape, b_shape) -> tuple[int, int, int]:
  """(stacked, input, output) dim counts of a kernel [*stacked, *in, *out] with A [*stacked, *in, r],
  B [*stacked, r, *out] (stacked: the scanned layers' leading dim)."""
  lead = len(a_shape) + len(b_shape) - 2 - len(kernel_shape)
  return lead, len(a_shape) - 1 - lead, len(b_shape) - 1 - lead


def factor_paths(params) -> dict[str, str]:
  """'/'-path of each factor-carrying kernel -> its factors' '/'-path prefix (`lora/<module path>`)."""
  out = {}

  def walk(node, path):
    if 'a' in node and 'b' in node and not isinstance(node['a'], dict):
      out['/'.join(path) + '/kernel'] = '/'.join((COLLECTION,) + path)
      return
    for k, v in node.items():
      walk(v, path + (k,))

  walk(params.get(COLLECTION, {}), ())
  return out


def delta(a: jax.Array, b: jax.Array, kernel_shape, scale: float) -> jax.Array:
  """(alpha / r) A B in the kernel's shape, in fp32."""
  lead, n_in, n_out = kernel_dims(kernel_shape, a.shape, b.shape)
  stacked = a.shape[:lead]
  a2 = a.astype(jnp.float32).reshape(*stacked, math.prod(a.shape[lead:lead + n_in]), a.shape[-1])
  b2 = b.astype(jnp.float32).reshape(*stacked, b.shape[lead], -1)
  return (scale * jnp.matmul(a2, b2)).reshape(kernel_shape)


def merge(params, scale: float):
  """Params with factors -> plain params with W + (alpha / r) A B (quantized kernels dequantized first), in each
  kernel's dtype (fp32 for a dequantized one)."""
  if COLLECTION not in params:
    return params
  from flax import traverse_util
  flat = traverse_util.flatten_dict({k: v for k, v in params.items() if k != COLLECTION}, sep='/')
  factors = traverse_util.flatten_dict(params[COLLECTION], sep='/')
  for kernel_path, prefix in factor_paths(params).items():
    w = flat[kernel_path]
    w = dequantize(w).astype(jnp.float32) if isinstance(w, qwix.QArray) else w
    rel = prefix[len(COLLECTION) + 1:]
    d = delta(factors[rel + '/a'], factors[rel + '/b'], w.shape, scale)
    flat[kernel_path] = (jnp.asarray(w, jnp.float32) + d).astype(w.dtype)
  return traverse_util.unflatten_dict(flat, sep='/')


def quantize_kernel(w: jax.Array, bits: int, lead: int, n_in: int, scale_dtype) -> qwix.QArray:
  """A kernel [*stacked, *in, *out] -> QArray: symmetric absmax scales per output channel and per BLOCK inputs
  along the last input dim (per input channel along the other input dims; the whole dim when BLOCK does not
  divide it). 4-bit codes are packed two to a uint8 along the last dim: XLA:CPU hands uint4 arrays from one
  program to the next unpacked, which the compiled train step refuses (layout mismatch), so we pack ourselves."""
  last_in = lead + n_in - 1
  tile = BLOCK if w.shape[last_in] % BLOCK == 0 else w.shape[last_in]
  channelwise = tuple(i for i in range(w.ndim) if i != last_in)
  q = qwix.quantize(w, QTYPES[bits], channelwise_axes=channelwise, tiled_axes={last_in: tile},
                    scale_dtype=scale_dtype)
  if bits == 4:
    if w.shape[-1] % 2:
      raise ValueError(f'base_bits=4 packs two codes per byte along the last kernel dim; {w.shape} is odd there')
    v = q.qvalue.astype(jnp.uint8)
    q = dataclasses.replace(q, qvalue=(v[..., 0::2] << 4) | v[..., 1::2])
  return q


def dequantize(q: qwix.QArray) -> jax.Array:
  """QArray from quantize_kernel -> the kernel in its scales' dtype (4-bit codes unpacked first)."""
  v = q.qvalue
  if q.qtype == 'nf4' and v.dtype == jnp.uint8:
    v = jnp.stack([v >> 4, v & 15], axis=-1).reshape(*v.shape[:-1], -1).astype(jnp.uint4)
    q = dataclasses.replace(q, qvalue=v)
  return qwix.dequantize(q)


def num_elements(x) -> int:
  """Elements of a kernel, stored plain or quantized (packed 4-bit: two per byte)."""
  if isinstance(x, qwix.QArray):
    return math.prod(x.qvalue.shape) * (2 if x.qtype == 'nf4' and x.qvalue.dtype == jnp.uint8 else 1)
  return math.prod(x.shape)
