"""Building blocks shared by the vision tower and the decoder.

Every weight carries logical axis names; `llava_jax/sharding.py` maps them to the mesh ('data', 'fsdp', 'tensor').
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from llava_jax.models import lora as lora_lib
from llava_jax.models.config import REMAT_POLICIES
from llava_jax.models.lora import LoraSpec

Array = jax.Array


def dtype_of(name: str):
  return jnp.dtype(name)


def logical_init(init, axes):
  return nn.with_logical_partitioning(init, axes)


class Dense(nn.Module):
  """y = x . kernel (+ bias) contracting `axis` of x with the leading dims of the kernel.

  The kernel is created at its full shape `[*contracted, *features]` so that its logical axis names
  (`axes`, one per kernel dim) hold at init and under any mesh. With `lora` (models/lora.py) a targeted layer adds
  (alpha / r) (dropout(x) A) B from the `lora` collection; a kernel stored as a qwix.QArray is dequantized.
  """
  features: tuple
  axes: tuple
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  use_bias: bool = False
  axis: tuple = (-1,)
  bias_axes: Optional[tuple] = None
  lora: Optional[LoraSpec] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    axis = tuple(a % x.ndim for a in self.axis)
    in_shape = tuple(x.shape[a] for a in axis)
    stored = self.get_variable('params', 'kernel') if self.has_variable('params', 'kernel') else None
    if isinstance(stored, qwix.QArray):  # QLoRA: a frozen base kernel stored quantized (models/lora.py)
      kernel = lora_lib.dequantize(stored)
    else:
      kernel = self.param('kernel', logical_init(nn.initializers.normal(0.02), self.axes),
                          in_shape + tuple(self.features), self.param_dtype)
    x = x.astype(self.dtype)
    y = _contract(x, kernel.astype(self.dtype), axis, tuple(self.features))
    if self.lora is not None:
      factors = self._lora_factors(in_shape, len(axis))
      if factors is not None:
        y = y + self._lora_delta(x, axis, *factors)
    if self.use_bias:
      bias_axes = self.bias_axes if self.bias_axes is not None else self.axes[len(axis):]
      bias = self.param('bias', logical_init(nn.initializers.zeros_init(), bias_axes), tuple(self.features),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y

  def _lora_factors(self, in_shape: tuple, n_in: int):
    """(A [*in, r], B [r, *out]) of this layer, created at init when `lora.targets` names its kernel; else None."""
    spec = self.lora
    if not (self.has_variable(lora_lib.COLLECTION, 'a') or
            (self.is_initializing() and spec.targets_module(self.path))):
      return None
    bound = 1.0 / math.sqrt(math.prod(in_shape))  # peft's kaiming_uniform(a=sqrt(5)) on A
    init_a = lambda: nn.LogicallyPartitioned(
        jax.random.uniform(self.make_rng('params'), in_shape + (spec.rank,), self.param_dtype, -bound, bound),
        self.axes[:n_in] + (None,))
    init_b = lambda: nn.LogicallyPartitioned(jnp.zeros((spec.rank,) + tuple(self.features), self.param_dtype),
                                             (None,) + self.axes[n_in:])
    a = nn.meta.unbox(self.variable(lora_lib.COLLECTION, 'a', init_a).value)
    b = nn.meta.unbox(self.variable(lora_lib.COLLECTION, 'b', init_b).value)
    return a, b

  def _lora_delta(self, x: Array, axis: tuple, a: Array, b: Array) -> Array:
    """(alpha / r) (dropout(x) A) B; dropout only when a 'dropout' rng is given (training)."""
    p = self.lora.dropout
    if p > 0 and self.has_rng('dropout'):
      keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - p, x.shape)
      x = jnp.where(keep, x / (1.0 - p), 0.0).astype(x.dtype)
    u = _contract(x, a.astype(self.dtype), axis, (a.shape[-1],))
    return _contract(u, b.astype(self.dtype), (u.ndim - 1,), tuple(self.features)) * self.lora.scale


def _contract(x: Array, k: Array, axis: tuple, features: tuple) -> Array:
  """x contracted over `axis` with the leading dims of k [*contracted, *features]."""
  if axis == tuple(range(x.ndim - len(axis), x.ndim)):
    # Contracting trailing dims: one 2-D matmul [tokens, in] x [in, out]. With several leading dims, XLA:CPU
    # computes the weight gradient from a transposed copy of the output gradient.
    lead = x.shape[:x.ndim - len(axis)]
    in_size = math.prod(k.shape[:len(axis)])
    y = jnp.dot(x.reshape(math.prod(lead), -1), k.reshape(in_size, -1))
    return y.reshape(*lead, *features)
  return jax.lax.dot_general(x, k, ((axis, tuple(range(len(axis)))), ((), ())))


def dense(features, axes, *, name, dtype, param_dtype, use_bias=False, axis=-1, bias_axes=None, lora=None):
  """Dense layer whose kernel (and bias) carry logical axis names."""
  features = features if isinstance(features, tuple) else (features,)
  axis = axis if isinstance(axis, tuple) else (axis,)
  return Dense(features, tuple(axes), dtype, param_dtype, use_bias, axis,
               tuple(bias_axes) if bias_axes is not None else None, lora, name=name)


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: upcast to fp32, x * rsqrt(mean(x^2) + eps), cast back, then times weight."""
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', logical_init(nn.initializers.ones_init(), ('norm',)), (x.shape[-1],),
                       self.param_dtype)
    return rms_norm(x, scale.astype(self.dtype), self.eps, jnp.dtype(self.dtype))


def _rms_normalize(x: Array, eps: float) -> tuple[Array, Array]:
  """fp32 (x * r, r) with r = rsqrt(mean(x^2) + eps) over the last dim."""
  x32 = x.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return x32 * r, r


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x: Array, scale: Array, eps: float, dtype) -> Array:
  """x [..., d], scale [d] in `dtype` -> normalize(x) in fp32, cast to `dtype`, times scale.

  A custom VJP so that the backward keeps only x (autodiff also keeps the fp32 normalized x and its cast).
  """
  return _rms_normalize(x, eps)[0].astype(dtype) * scale


def _rms_norm_fwd(x, scale, eps, dtype):
  return rms_norm(x, scale, eps, dtype), (x, scale)


def _rms_norm_bwd(eps, dtype, res, dy):
  x, scale = res
  n, r = _rms_normalize(x, eps)
  dy32 = dy.astype(jnp.float32)
  g = dy32 * scale.astype(jnp.float32)
  dx = r * (g - n * jnp.mean(g * n, axis=-1, keepdims=True))
  dscale = jnp.sum((dy32 * n).reshape(-1, n.shape[-1]), axis=0)
  return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm computed in fp32 (CLIP)."""
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param('scale', logical_init(nn.initializers.ones_init(), ('norm',)), (d,), self.param_dtype)
    bias = self.param('bias', logical_init(nn.initializers.zeros_init(), ('norm',)), (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, llama3: Optional[tuple] = None) -> np.ndarray:
  """RoPE inverse frequencies [head_dim / 2] (fp32, as HF computes them): 1 / theta^(arange(0, d, 2) / d).

  llama3 = (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings): Llama-3.1's scaling,
  which divides the low frequencies by `factor`, keeps the high ones and interpolates smoothly in between.
  """
  inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim))))
  inv = inv.astype(np.float32)
  if llama3 is None:
    return inv
  factor, low, high, old_len = llama3
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > old_len / low, inv / factor, inv)
  smooth = (old_len / wavelen - low) / (high - low)
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled).astype(np.float32)


def rope(x: Array, positions: Array, inv_freq) -> Array:
  """Rotary embedding in HF's rotate_half convention.

  x: [batch, seq, heads, head_dim]; positions: [batch, seq] int; inv_freq: [head_dim / 2] (see rope_inv_freq).
  """
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [b, s, d/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [b, s, 1, d]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


# Attention kernels: 'xla' (any backend; the formulation below), 'cudnn' (flash attention through
# jax.nn.dot_product_attention on GPU), 'splash' (Pallas splash attention on TPU). 'auto' picks by backend.
ATTENTION_KERNELS = ('auto', 'xla', 'cudnn', 'splash')
SPLASH_BLOCK = 128  # splash attention tiles the sequence in blocks of this many tokens (TPU lane width)


def select_attention_kernel(backend: str, dtype, q_len: int, kv_len: int, *, has_mask: bool,
                            kernel: str = 'auto') -> str:
  """The kernel `attention` runs: `kernel` itself unless 'auto'.

  auto: cuDNN on GPU for bf16/fp16 (it has no fp32 flash kernel); splash on TPU for self-attention whose length
  tiles into SPLASH_BLOCK and whose only masks are causal and segments (splash takes no free-form mask);
  XLA otherwise (CPU, fp32 on GPU, decoding steps against a KV cache).
  """
  if kernel not in ATTENTION_KERNELS:
    raise ValueError(f'attention kernel {kernel!r}; allowed: {ATTENTION_KERNELS}')
  if kernel != 'auto':
    return kernel
  if backend == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  if backend == 'tpu' and not has_mask and q_len == kv_len and q_len % SPLASH_BLOCK == 0:
    return 'splash'
  return 'xla'


def segment_mask(segment_ids: Array) -> Array:
  """segment_ids int [batch, seq] -> bool [batch, 1, seq, seq]: query i sees key j when both are in one segment.

  Padding (segment 0) sees padding only, so that no row is empty and no kernel meets a fully masked row.
  """
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def attention(q: Array, k: Array, v: Array, mask: Optional[Array] = None, *, is_causal: bool = False,
              segment_ids: Optional[Array] = None, kernel: str = 'auto') -> Array:
  """Softmax attention with fp32 logits/softmax; grouped-query when k/v have fewer heads.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
  mask: bool broadcastable to [batch, heads, q_len, kv_len] (True = attend); is_causal: query i sees keys <= i;
  segment_ids: int [batch, seq] for self-attention over packed rows (see segment_mask).
  Returns [batch, q_len, heads, head_dim]. The kernel is chosen by select_attention_kernel; a shape or version
  cuDNN does not take falls back to XLA.
  """
  name = select_attention_kernel(jax.default_backend(), q.dtype, q.shape[1], k.shape[1], has_mask=mask is not None,
                                 kernel=kernel)
  if name == 'splash':
    return splash_attention(q, k, v, is_causal=is_causal, segment_ids=segment_ids)
  if segment_ids is not None:
    mask = segment_mask(segment_ids) if mask is None else mask & segment_mask(segment_ids)
  if name == 'cudnn':
    try:
      # cuDNN builds the causal mask itself (and skips the blocks above the diagonal); padding and segments come
      # as a mask, which it takes as a bias of full [q_len, kv_len] extent only.
      full = None if mask is None else jnp.broadcast_to(mask, (*mask.shape[:-2], q.shape[1], k.shape[1]))
      return jax.nn.dot_product_attention(q, k, v, mask=full, is_causal=is_causal, implementation='cudnn')
    except (ValueError, NotImplementedError, RuntimeError, TypeError):
      pass  # a shape, dtype or cuDNN version cuDNN does not take: fall through
  if is_causal:
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
    mask = causal if mask is None else mask & causal
  b, t, n, hd = q.shape
  kv = k.shape[2]
  # Heads first, and the query heads of a kv group as extra rows: [b, kv, groups * q_len, head_dim], so the score
  # and value products are plain batched matmuls over (batch, kv head), with no broadcast of k or v.
  qh = jnp.swapaxes(q, 1, 2).reshape(b, kv, n // kv * t, hd)
  o = _softmax_attention(qh, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
                         None if mask is None else _grouped_mask(mask, kv, n // kv))
  return jnp.swapaxes(o.reshape(b, n, t, hd), 1, 2)


def splash_attention(q: Array, k: Array, v: Array, *, is_causal: bool, segment_ids: Optional[Array],
                     interpret: bool = False) -> Array:
  """Pallas splash attention (TPU; `interpret=True` runs the same kernel on any backend, slowly).

  Shapes as in `attention`; seq a multiple of SPLASH_BLOCK. The kernel takes one sequence with heads first
  ([heads, seq, head_dim], grouped-query natively) and does not scale q; it is vmapped over the batch. A Pallas
  call is not partitioned by XLA, so under a mesh (jax.set_mesh) it runs per shard in a shard_map: batch over the
  mesh axes of 'activation_batch', heads over those of 'activation_heads' (the logical rules in force), each only
  where it divides.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU-only kernel: imported on use
  b, t, n, hd = q.shape
  seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = heads_axes = None
  if not mesh.empty and mesh.size > 1:
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)
    fits = lambda axes, *dims: axes if axes and all(d % size(axes) == 0 for d in dims) else None
    spec = nn.logical_to_mesh_axes(('activation_batch', 'activation_heads'))
    as_tuple = lambda x: () if x is None else (x,) if isinstance(x, str) else tuple(x)
    batch_axes = fits(as_tuple(spec[0]), b)
    heads_axes = fits(as_tuple(spec[1]), n, k.shape[2])

  def per_shard(q, k, v, seg):
    one = splash.CausalMask((t, t)) if is_causal else splash.FullMask((t, t))
    kernel = splash.make_splash_mha(splash.MultiHeadMask([one] * q.shape[2]), head_shards=1, q_seq_shards=1,
                                    block_sizes=splash.BlockSizes(*(SPLASH_BLOCK,) * 8), interpret=interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    o = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1)))(
        heads_first(q * hd ** -0.5), heads_first(k), heads_first(v), seg)
    return heads_first(o).astype(q.dtype)

  if batch_axes is None and heads_axes is None:
    return per_shard(q, k, v, seg)
  P = jax.sharding.PartitionSpec
  qkv = P(batch_axes, None, heads_axes, None)
  return jax.shard_map(per_shard, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch_axes, None)), out_specs=qkv,
                       check_vma=False)(q, k, v, seg)


def _grouped_mask(mask: Array, kv: int, groups: int) -> Array:
  """[b|1, 1|heads, q_len, kv_len] -> [b|1, 1|kv, 1|groups, q_len, kv_len] (heads = kv * groups)."""
  mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  if mask.shape[1] == 1:
    return mask[:, :, None]
  return mask.reshape(mask.shape[0], kv, groups, *mask.shape[2:])


def _masked(x: Array, mask: Optional[Array], fill) -> Array:
  """where(mask, x, fill) for x [b, kv, groups * q_len, kv_len] and a grouped mask (see _grouped_mask)."""
  if mask is None:
    return x
  b, kv, rows, s = x.shape
  x = x.reshape(b, kv, -1, mask.shape[-2], s)
  return jnp.where(mask, x, fill).reshape(b, kv, rows, s)


def _attention_probs(q: Array, k: Array, mask: Optional[Array]) -> Array:
  """softmax(q k^T / sqrt(head_dim)) in fp32: [b, kv, rows, kv_len]."""
  scores = jnp.einsum('bkqh,bksh->bkqs', q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
  scores = _masked(scores, mask, jnp.finfo(jnp.float32).min)
  scores = scores - jnp.max(scores, axis=-1, keepdims=True)
  e = jnp.exp(scores)
  return e / jnp.sum(e, axis=-1, keepdims=True)


@jax.custom_vjp
def _softmax_attention(q: Array, k: Array, v: Array, mask: Optional[Array]) -> Array:
  """q [b, kv, rows, hd], k/v [b, kv, kv_len, hd] -> [b, kv, rows, hd].

  A custom VJP so that the backward keeps only q, k, v and the fp32 probabilities (autodiff of the softmax and
  the mask select keeps several [b, heads, q_len, kv_len] buffers per layer) and uses the softmax gradient
  p * (dp - rowsum(p * dp)) in one elementwise pass.
  """
  return jnp.einsum('bkqs,bksh->bkqh', _attention_probs(q, k, mask).astype(v.dtype), v)


def _softmax_attention_fwd(q, k, v, mask):
  p = _attention_probs(q, k, mask)
  return jnp.einsum('bkqs,bksh->bkqh', p.astype(v.dtype), v), (q, k, v, p, mask)


def _softmax_attention_bwd(res, do):
  q, k, v, p, mask = res
  # dv and dk contract over the query rows; computing their transposes keeps both matmul operands row-major
  # (the direct form makes XLA:CPU transpose p, the largest operand).
  dv = jnp.swapaxes(jnp.einsum('bkqh,bkqs->bkhs', do, p.astype(do.dtype)), -1, -2)
  dp = jnp.einsum('bkqh,bksh->bkqs', do, v, preferred_element_type=jnp.float32)
  ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))
  # A fully masked row has uniform p but no gradient into the masked scores.
  ds = (_masked(ds, mask, 0.0) * (q.shape[-1] ** -0.5)).astype(q.dtype)
  dq = jnp.einsum('bkqs,bksh->bkqh', ds, k)
  dk = jnp.swapaxes(jnp.einsum('bkqh,bkqs->bkhs', q, ds), -1, -2)
  return dq, dk, dv, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
  """silu(gate) * up. The backward keeps only gate and up (autodiff keeps sigmoid(gate), silu(gate) as well)."""
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dy):
  gate, up = res
  g, u, dy32 = gate.astype(jnp.float32), up.astype(jnp.float32), dy.astype(jnp.float32)
  sig = jax.nn.sigmoid(g)
  dgate = dy32 * u * sig * (1.0 + g * (1.0 - sig))
  return dgate.astype(gate.dtype), (dy32 * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def maybe_remat(block_cls, policy: str, static_argnums=()):
  """`block_cls` rematerialised with `policy` (a key of config.REMAT_POLICIES)."""
  if REMAT_POLICIES[policy] is None:
    return block_cls
  return nn.remat(block_cls, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[policy]), prevent_cse=False,
                  static_argnums=static_argnums)
