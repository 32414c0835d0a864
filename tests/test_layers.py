"""The hand-written backward passes in llava_jax/models/layers.py against autodiff of the plain formulas (fp32, CPU).

Errors are max |ours - ref| / max |ref| over each gradient; the bound is 1e-5.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.models import layers

TOL = 1e-5


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def grads_of(fn, args, argnums):
  """Value and gradients of sum(fn(*args) * w) for a fixed random cotangent w."""
  out = fn(*args)
  w = jax.random.normal(jax.random.key(9), out.shape, out.dtype)
  return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * w), argnums=argnums))(*args)


def normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize('heads,kv_heads,masked', [(4, 4, False), (4, 2, True), (6, 1, True)])
def test_attention_gradients_match_autodiff(heads, kv_heads, masked):
  """Grouped-query and padding masks, including rows with no visible key (left padding), whose gradient is 0."""
  b, t, hd = 3, 10, 8
  q, k, v = normal(0, (b, t, heads, hd)), normal(1, (b, t, kv_heads, hd)), normal(2, (b, t, kv_heads, hd))
  mask = None
  if masked:
    valid = np.ones((b, t), bool)
    valid[1, :4] = False   # left padding: query rows 0-3 of sample 1 see no key
    valid[2, -3:] = False  # right padding
    mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None, None] & valid[:, None, None, :])
  ours = grads_of(lambda q, k, v: layers.attention(q, k, v, mask), (q, k, v), (0, 1, 2))
  ref = grads_of(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla'),
                 (q, k, v), (0, 1, 2))
  assert rel_err(ours[0], ref[0]) <= TOL
  for name, g, g_ref in zip('qkv', ours[1], ref[1]):
    assert rel_err(g, g_ref) <= TOL, name


def test_swiglu_gradients_match_autodiff():
  gate, up = normal(3, (4, 7, 16)), normal(4, (4, 7, 16))
  ours = grads_of(layers.swiglu, (gate, up), (0, 1))
  ref = grads_of(lambda g, u: jax.nn.silu(g) * u, (gate, up), (0, 1))
  assert rel_err(ours[0], ref[0]) <= TOL
  assert max(rel_err(a, b) for a, b in zip(ours[1], ref[1])) <= TOL


def test_rms_norm_gradients_match_autodiff():
  x, scale = 3.0 * normal(5, (4, 7, 16)) + 1.0, 1.0 + 0.1 * normal(6, (16,))

  def plain(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * scale

  ours = grads_of(lambda x, s: layers.rms_norm(x, s, 1e-5, jnp.dtype(jnp.float32)), (x, scale), (0, 1))
  ref = grads_of(plain, (x, scale), (0, 1))
  assert rel_err(ours[0], ref[0]) <= TOL
  assert max(rel_err(a, b) for a, b in zip(ours[1], ref[1])) <= TOL


@pytest.mark.parametrize('axis,features', [(-1, (6,)), ((-2, -1), (6,)), (-1, (2, 3)), (1, (6,))])
def test_dense_equals_dot_general(axis, features):
  """The 2-D matmul taken for trailing contracting dims, and dot_general otherwise, give the same map."""
  x = normal(7, (2, 3, 4, 5))
  axes = tuple(['a'] * (1 if isinstance(axis, int) else len(axis)) + ['b'] * len(features))
  module = layers.dense(features, axes, name='d', dtype=jnp.float32, param_dtype=jnp.float32, axis=axis)
  params = nn.meta.unbox(module.init(jax.random.key(0), x))
  kernel = params['params']['kernel']
  axis_t = tuple(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
  ref = jax.lax.dot_general(x, kernel, ((axis_t, tuple(range(len(axis_t)))), ((), ())))
  assert rel_err(module.apply(params, x), ref) <= TOL
