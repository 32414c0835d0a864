"""CLIP ViT vision tower (ViT-L/14 in LLaVA), returning the hidden state of `feature_layer`.

Only the blocks up to the selected layer are computed. The remaining blocks and `post_layernorm` are created at
init (so an imported HF checkpoint round-trips losslessly) but are never run.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.models.config import VisionConfig
from llava_jax.models.layers import LayerNorm, attention, dense, dtype_of, logical_init, maybe_remat

Array = jax.Array


def quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


class CLIPBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""
  config: VisionConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array, _=None):
    c, dt, pdt = self.config, self.dtype, self.param_dtype
    nh, hd = c.num_heads, c.hidden_size // c.num_heads
    h = LayerNorm(c.layer_norm_eps, dt, pdt, name='layer_norm1')(x)
    q = dense((nh, hd), ('embed', 'heads', 'head_dim'), name='q_proj', dtype=dt, param_dtype=pdt, use_bias=True)(h)
    k = dense((nh, hd), ('embed', 'heads', 'head_dim'), name='k_proj', dtype=dt, param_dtype=pdt, use_bias=True)(h)
    v = dense((nh, hd), ('embed', 'heads', 'head_dim'), name='v_proj', dtype=dt, param_dtype=pdt, use_bias=True)(h)
    o = attention(q, k, v, None)
    o = dense(c.hidden_size, ('heads', 'head_dim', 'embed'), name='out_proj', dtype=dt, param_dtype=pdt,
              use_bias=True, axis=(-2, -1), bias_axes=('embed',))(o)
    x = x + o
    h = LayerNorm(c.layer_norm_eps, dt, pdt, name='layer_norm2')(x)
    h = dense(c.intermediate_size, ('embed', 'mlp'), name='fc1', dtype=dt, param_dtype=pdt, use_bias=True)(h)
    h = quick_gelu(h)
    h = dense(c.hidden_size, ('mlp', 'embed'), name='fc2', dtype=dt, param_dtype=pdt, use_bias=True)(h)
    x = x + h
    x = nn.with_logical_constraint(x, ('activation_batch', 'activation_length', 'activation_embed'))
    return x, None


def _scanned_blocks(config, dtype, param_dtype, length, remat_policy, name):
  block = maybe_remat(CLIPBlock, remat_policy)
  return nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True}, length=length,
                 metadata_params={nn.PARTITION_NAME: 'layers'})(config, dtype, param_dtype, name=name)


class CLIPVisionTower(nn.Module):
  """pixel_values [batch, H, W, 3] (normalized) -> features [batch, N, hidden] of the selected layer."""
  config: VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat_policy: str = 'none'

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    c, dt, pdt = self.config, self.dtype, self.param_dtype
    b = pixel_values.shape[0]
    patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                      padding='VALID', use_bias=False, dtype=dt, param_dtype=pdt, name='patch_embedding',
                      kernel_init=logical_init(nn.initializers.normal(0.02), (None, None, None, 'embed')))(
                          pixel_values.astype(dt))
    patches = patches.reshape(b, -1, c.hidden_size)  # [b, num_patches, d] row-major like HF's flatten(2)
    cls = self.param('class_embedding', logical_init(nn.initializers.normal(0.02), ('embed',)),
                     (c.hidden_size,), pdt)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, c.hidden_size)), patches], axis=1)
    pos = self.param('position_embedding', logical_init(nn.initializers.normal(0.02), (None, 'embed')),
                     (c.num_patches + 1, c.hidden_size), pdt)
    x = x + pos.astype(dt)[None]
    x = LayerNorm(c.layer_norm_eps, dt, pdt, name='pre_layrnorm')(x)
    x = nn.with_logical_constraint(x, ('activation_batch', 'activation_length', 'activation_embed'))
    used = c.num_layers_used
    x, _ = _scanned_blocks(c, dt, pdt, used, self.remat_policy, 'layers')(x, None)
    if self.is_initializing():
      # Parameters for the blocks after the feature layer and the final norm: kept for export, never computed.
      if c.num_layers > used:
        _scanned_blocks(c, dt, pdt, c.num_layers - used, 'none', 'unused_layers')(x, None)
      LayerNorm(c.layer_norm_eps, dt, pdt, name='post_layernorm')(x[:, 0])
    if c.feature_select == 'patch':
      x = x[:, 1:]
    return x
