"""The projection W from image features to the word-embedding space (LLaVA: linear; LLaVA-1.5: mlp2x_gelu)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.models.layers import dense


class Projector(nn.Module):
  """image features [batch, N, vision_hidden] -> [batch, N, d_model]."""
  kind: str
  out_features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == 'identity':
      return x
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
    x = dense(self.out_features, ('embed', 'mlp'), name='linear_1', bias_axes=('mlp',), **kw)(x)
    if self.kind == 'mlp2x_gelu':
      x = nn.gelu(x, approximate=False)  # exact erf GELU as torch.nn.GELU(); JAX's default is tanh
      x = dense(self.out_features, ('mlp', 'embed'), name='linear_2', bias_axes=('embed',), **kw)(x)
    return x
