"""Building blocks shared by the vision tower and the decoder.

Every weight carries logical axis names; `llava_jax/sharding.py` maps them to the mesh ('data', 'fsdp', 'tensor').
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def dtype_of(name: str):
  return jnp.dtype(name)


def logical_init(init, axes):
  return nn.with_logical_partitioning(init, axes)


class Dense(nn.Module):
  """y = x . kernel (+ bias) contracting `axis` of x with the leading dims of the kernel.

  The kernel is created at its full shape `[*contracted, *features]` so that its logical axis names
  (`axes`, one per kernel dim) hold at init and under any mesh.
  """
  features: tuple
  axes: tuple
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  use_bias: bool = False
  axis: tuple = (-1,)
  bias_axes: Optional[tuple] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    axis = tuple(a % x.ndim for a in self.axis)
    in_shape = tuple(x.shape[a] for a in axis)
    kernel = self.param('kernel', logical_init(nn.initializers.normal(0.02), self.axes),
                        in_shape + tuple(self.features), self.param_dtype)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias_axes = self.bias_axes if self.bias_axes is not None else self.axes[len(axis):]
      bias = self.param('bias', logical_init(nn.initializers.zeros_init(), bias_axes), tuple(self.features),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def dense(features, axes, *, name, dtype, param_dtype, use_bias=False, axis=-1, bias_axes=None):
  """Dense layer whose kernel (and bias) carry logical axis names."""
  features = features if isinstance(features, tuple) else (features,)
  axis = axis if isinstance(axis, tuple) else (axis,)
  return Dense(features, tuple(axes), dtype, param_dtype, use_bias, axis,
               tuple(bias_axes) if bias_axes is not None else None, name=name)


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: upcast to fp32, x * rsqrt(mean(x^2) + eps), cast back, then times weight."""
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', logical_init(nn.initializers.ones_init(), ('norm',)), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)


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


def rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding in HF's rotate_half convention.

  x: [batch, seq, heads, head_dim]; positions: [batch, seq] int.
  """
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [b, s, 1, d]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def attention(q: Array, k: Array, v: Array, mask: Optional[Array], *, is_causal: bool = False) -> Array:
  """Softmax attention with fp32 logits/softmax; grouped-query when k/v have fewer heads.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
  mask: bool broadcastable to [batch, heads, q_len, kv_len] (True = attend).
  """
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)


REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(block_cls, policy: str, static_argnums=()):
  if policy == 'none':
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[policy], prevent_cse=False, static_argnums=static_argnums)
