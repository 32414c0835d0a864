"""Packed rows on the model side (fp32, CPU, tiny random LLaVA): attention confined to each sample, RoPE from
restarting positions, several images per row, the loss and its gradients, and the attention kernel choice.

Samples A..D (lengths 30, 12, 24, 22; A, C, D with an image) unpacked one per row of 32 tokens, or packed two per
row of 48 tokens: row 0 = A + B (one image slot used of 2), row 1 = C + D (both slots).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from llava_jax.convert import load_hf_llava
from llava_jax.models import layers
from llava_jax.train import partition
from llava_jax.train.step import make_train_step, next_token_loss, supervised_targets

IMAGE = 100  # conftest.IMAGE_TOKEN
LENGTHS, HAS_IMAGE = (30, 12, 24, 22), (True, False, True, True)
ROWS = ((0, 1), (2, 3))  # samples of each packed row
UNPACKED_LEN, PACKED_LEN, SLOTS = 32, 48, 2


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def make_samples(n_image: int, seed: int = 0):
  """Per sample (ids, labels, image [32, 32, 3] or None): BOS, the image tokens, text; the text after the image
  is supervised, and the first label is a real token (packing must not train across that boundary)."""
  rng = np.random.default_rng(seed)
  samples = []
  for length, has_image in zip(LENGTHS, HAS_IMAGE):
    ids = np.concatenate([[1], rng.integers(2, IMAGE, length - 1)]).astype(np.int32)
    start = 1
    if has_image:
      ids[1:1 + n_image] = IMAGE
      start = 1 + n_image
    labels = np.full(length, -100, np.int32)
    labels[start:] = ids[start:]
    labels[0] = ids[0]
    image = rng.normal(size=(32, 32, 3)).astype(np.float32) if has_image else None
    samples.append((ids, labels, image))
  return samples


def unpacked_batch(samples):
  b = len(samples)
  batch = {'input_ids': np.zeros((b, UNPACKED_LEN), np.int32), 'labels': np.full((b, UNPACKED_LEN), -100, np.int32),
           'attention_mask': np.zeros((b, UNPACKED_LEN), np.int32),
           'pixel_values': np.zeros((b, 32, 32, 3), np.float32)}
  for i, (ids, labels, image) in enumerate(samples):
    batch['input_ids'][i, :len(ids)] = ids
    batch['labels'][i, :len(ids)] = labels
    batch['attention_mask'][i, :len(ids)] = 1
    if image is not None:
      batch['pixel_values'][i] = image
  return batch


def packed_batch(samples, rows=ROWS):
  """The batch contract of packed rows (see llava_jax/train/step.py)."""
  b = len(rows)
  batch = {k: np.zeros((b, PACKED_LEN), np.int32) for k in ('input_ids', 'segment_ids', 'positions')}
  batch['labels'] = np.full((b, PACKED_LEN), -100, np.int32)
  batch['pixel_values'] = np.zeros((b, SLOTS, 32, 32, 3), np.float32)
  batch['image_valid'] = np.zeros((b, SLOTS), bool)
  for r, members in enumerate(rows):
    at, slot = 0, 0
    for seg, i in enumerate(members, start=1):
      ids, labels, image = samples[i]
      span = slice(at, at + len(ids))
      batch['input_ids'][r, span], batch['labels'][r, span] = ids, labels
      batch['segment_ids'][r, span] = seg
      batch['positions'][r, span] = np.arange(len(ids))
      if image is not None:
        batch['pixel_values'][r, slot], batch['image_valid'][r, slot] = image, True
        slot += 1
      at += len(ids)
  batch['attention_mask'] = (batch['segment_ids'] > 0).astype(np.int32)
  return batch


def spans(rows=ROWS):
  """sample -> (row, slice) in the packed batch."""
  out = {}
  for r, members in enumerate(rows):
    at = 0
    for i in members:
      out[i] = (r, slice(at, at + LENGTHS[i]))
      at += LENGTHS[i]
  return out


@pytest.fixture(scope='module')
def llava(tiny, tmp_path_factory):
  hf = tiny.hf_llava(seed=5)
  path = str(tmp_path_factory.mktemp('llava_packing'))
  hf.save_pretrained(path)
  model, params = load_hf_llava(path)
  return hf, model, params


@pytest.fixture(scope='module')
def forward(llava):
  _, model, params = llava
  return jax.jit(lambda p, b: model.apply({'params': p}, b['input_ids'], b['pixel_values'], b['attention_mask'],
                                          **{k: b[k] for k in ('segment_ids', 'positions', 'image_valid') if k in b}))


@pytest.fixture(scope='module')
def samples(llava):
  return make_samples(llava[1].config.num_image_tokens)


@pytest.fixture(scope='module')
def packed_logits(llava, forward, samples):
  return np.asarray(forward(llava[2], packed_batch(samples)))


def test_packed_logits_equal_each_sample_alone(llava, forward, samples, packed_logits):
  unpacked = np.asarray(forward(llava[2], unpacked_batch(samples)))
  for i, (r, span) in spans().items():
    err = rel_err(packed_logits[r, span], unpacked[i, :LENGTHS[i]])
    assert err <= 1e-5, (i, err)


def test_positions_restart_at_each_sample(llava, forward, samples, packed_logits):
  """The given positions drive RoPE. Restarting ones give each sample its own logits (test above); as RoPE is
  relative and attention stays in the sample, a constant shift leaves them unchanged, while any other change does
  not."""
  batch = packed_batch(samples)
  assert batch['positions'][0, :LENGTHS[0] + 3].tolist() == list(range(LENGTHS[0])) + [0, 1, 2]
  r, span = spans()[1]
  for change, bound in (('shift', 1e-5), ('flat', None)):
    b = dict(batch, positions=batch['positions'].copy())
    b['positions'][r, span] = b['positions'][r, span] + 7 if change == 'shift' else 0
    err = rel_err(np.asarray(forward(llava[2], b))[r, span], packed_logits[r, span])
    assert err <= bound if bound else err > 1e-2, (change, err)


def test_changing_one_sample_leaves_the_others_unchanged(llava, forward, samples, packed_logits):
  """A token of A (row 0), and the image of C (row 1, slot 0): B and D keep their logits."""
  changed = [list(s) for s in samples]
  ids = changed[0][0].copy()
  ids[-3] = (ids[-3] + 1) % IMAGE
  changed[0][0] = ids
  changed[2][2] = changed[2][2] + 1.0
  out = np.asarray(forward(llava[2], packed_batch([tuple(s) for s in changed])))
  at = spans()
  for i in (1, 3):
    r, span = at[i]
    assert np.abs(out[r, span] - packed_logits[r, span]).max() <= 1e-6 * np.abs(packed_logits[r, span]).max()
  for i in (0, 2):  # the change itself is seen
    r, span = at[i]
    assert rel_err(out[r, span], packed_logits[r, span]) > 1e-3


def test_packed_step_equals_unpacked_step(llava, samples):
  """One train step (SGD, lr 1, projector + LLM trained): equal loss, supervised count and gradients; the same
  with gradient accumulation over the packed rows."""
  _, model, params = llava
  rules = (('projector/.*', True), ('language_model/.*', True), ('.*', False))
  mask = partition.trainable_paths(params, rules)
  trainable, frozen = partition.split(jax.tree.map(jnp.asarray, params), mask)
  tx = optax.sgd(1.0)
  step = jax.jit(make_train_step(model, tx, lambda s: 1.0))
  from llava_jax.train.step import TrainState
  state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable))
  out = {}
  for name, batch in (('unpacked', unpacked_batch(samples)), ('packed', packed_batch(samples))):
    new, m = step(state, frozen, batch)
    out[name] = m, jax.tree.map(lambda a, b: np.asarray(b - a), trainable, new.params)
  # Accumulation over the two packed rows (one per micro-batch) divides once by the global supervised count.
  new, m = jax.jit(make_train_step(model, tx, lambda s: 1.0, grad_accum_steps=2))(state, frozen,
                                                                                   packed_batch(samples))
  out['accumulated'] = m, jax.tree.map(lambda a, b: np.asarray(b - a), trainable, new.params)
  (m_u, g_u), (m_p, g_p), (m_a, g_a) = out['unpacked'], out['packed'], out['accumulated']
  expected = sum(int((s[1][1:] != -100).sum()) for s in samples)
  assert float(m_u['tokens']) == float(m_p['tokens']) == expected
  assert abs(float(m_p['loss']) - float(m_u['loss'])) <= 1e-5 * abs(float(m_u['loss']))
  flat_u, flat_p = partition.flatten(g_u), partition.flatten(g_p)
  worst = max(rel_err(flat_p[k], flat_u[k]) for k in flat_u)
  flat_a = partition.flatten(g_a)
  assert abs(float(m_a['loss']) - float(m_p['loss'])) <= 1e-5 * abs(float(m_p['loss']))
  assert max(rel_err(flat_a[k], flat_p[k]) for k in flat_p) <= 1e-5
  print(f'packed vs unpacked: loss {float(m_p["loss"]):.6f} vs {float(m_u["loss"]):.6f}, worst gradient rel err '
        f'{worst:.2e}')
  assert worst <= 1e-5


def test_loss_never_crosses_a_segment_boundary():
  labels = np.array([[5, 6, 7, 8, 9, 3]], np.int32)
  seg = np.array([[1, 1, 2, 2, 2, 0]], np.int32)
  assert supervised_targets(labels, seg).tolist() == [[True, False, True, True, False]]
  logits = jax.random.normal(jax.random.key(0), (1, 6, 11))
  loss, count = next_token_loss(logits, labels, seg)
  lp = jax.nn.log_softmax(logits[0])
  ref = -(lp[0, 6] + lp[2, 8] + lp[3, 9])
  assert float(count) == 3 and abs(float(loss) - float(ref)) <= 1e-6 * abs(float(ref))


def test_two_images_in_one_sample_match_hf(llava, forward, samples):
  """transformers' LlavaForConditionalGeneration fills its image tokens with the images in order; so do our slots,
  for the sample alone (slots of one row) and packed behind another sample."""
  hf, model, params = llava
  n = model.config.num_image_tokens
  rng = np.random.default_rng(7)
  ids = np.concatenate([[1], np.full(n, IMAGE), rng.integers(2, IMAGE, 3), np.full(n, IMAGE),
                        rng.integers(2, IMAGE, 4)]).astype(np.int32)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids[None]).long(),
             pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()[0]
  alone = np.asarray(jax.jit(model.apply)({'params': params}, ids[None], images[None]))[0]
  err = rel_err(alone, ref)
  print(f'two-image sample vs HF: rel err {err:.2e}')
  assert err <= 1e-4
  lead = samples[1][0]  # B, text-only, then the two-image sample in the same row
  t = len(lead) + len(ids)
  batch = {'input_ids': np.concatenate([lead, ids])[None], 'segment_ids': np.repeat([[1, 2]], [len(lead), len(ids)],
                                                                                     axis=1).astype(np.int32),
           'positions': np.concatenate([np.arange(len(lead)), np.arange(len(ids))])[None].astype(np.int32),
           'attention_mask': np.ones((1, t), np.int32), 'pixel_values': images[None],
           'image_valid': np.ones((1, 2), bool)}
  packed = np.asarray(forward(params, batch))[0, len(lead):]
  assert rel_err(packed, ref) <= 1e-4


def test_two_image_prompt_generates_like_hf(llava):
  """Sampler with pixel_values [1, 2, H, W, 3] (KV cache, greedy) gives transformers' greedy tokens."""
  from llava_jax.generate import Sampler
  hf, model, params = llava
  n = model.config.num_image_tokens
  rng = np.random.default_rng(8)
  ids = np.concatenate([[1], np.full(n, IMAGE), rng.integers(2, IMAGE, 3), np.full(n, IMAGE),
                        rng.integers(2, IMAGE, 2)]).astype(np.int32)[None]
  images = rng.normal(size=(1, 2, 32, 32, 3)).astype(np.float32)
  new = 6
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.from_numpy(ids).long(),
                      pixel_values=torch.from_numpy(images[0].transpose(0, 3, 1, 2)), max_new_tokens=new,
                      do_sample=False, min_new_tokens=new).numpy()[0, ids.shape[1]:]
  sampler = Sampler(model, params)
  out = sampler(ids, None, images, max_new_tokens=new).tokens[0]
  np.testing.assert_array_equal(out, ref)


def test_image_tokens_must_fit_the_valid_slots(llava):
  _, model, params = llava
  n = model.config.num_image_tokens
  ids = np.array([[1] + [IMAGE] * (2 * n) + [5], [1] + [IMAGE] * n + [5] * (n + 1)], np.int32)
  pix = np.zeros((2, 2, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match=r'rows \[0\] .* for \[1\] valid image slots'):
    model.apply({'params': params}, ids, pix, image_valid=np.array([[True, False], [True, False]]))


# ------------------------------------------------------------------------------------------ attention kernels


def test_kernel_selection():
  pick = layers.select_attention_kernel
  assert pick('cpu', jnp.bfloat16, 256, 256, has_mask=False) == 'xla'
  assert pick('gpu', jnp.bfloat16, 256, 256, has_mask=True) == 'cudnn'
  assert pick('gpu', jnp.float16, 1, 300, has_mask=True) == 'cudnn'   # cuDNN decides; XLA if it declines
  assert pick('gpu', jnp.float32, 256, 256, has_mask=False) == 'xla'   # cuDNN has no fp32 flash kernel
  assert pick('tpu', jnp.bfloat16, 256, 256, has_mask=False) == 'splash'
  assert pick('tpu', jnp.bfloat16, 257, 257, has_mask=False) == 'xla'  # CLIP's 257 tokens do not tile
  assert pick('tpu', jnp.bfloat16, 256, 256, has_mask=True) == 'xla'   # free-form masks: padding, KV cache
  assert pick('tpu', jnp.bfloat16, 1, 256, has_mask=False) == 'xla'
  assert pick('cpu', jnp.float32, 8, 8, has_mask=False, kernel='splash') == 'splash'
  with pytest.raises(ValueError, match="attention kernel 'flash'; allowed"):
    pick('cpu', jnp.float32, 8, 8, has_mask=False, kernel='flash')


def test_segment_mask_is_exact():
  seg = jnp.array([[1, 1, 2, 0]])
  expected = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
  assert layers.segment_mask(seg)[0, 0].astype(int).tolist() == expected


def qkv(t, heads=4, kv_heads=2, hd=16, b=2):
  ks = jax.random.split(jax.random.key(3), 3)
  return (jax.random.normal(ks[0], (b, t, heads, hd)), jax.random.normal(ks[1], (b, t, kv_heads, hd)),
          jax.random.normal(ks[2], (b, t, kv_heads, hd)))


def packed_segments(t):
  seg = np.zeros((2, t), np.int32)
  seg[0, :t // 3], seg[0, t // 3:t - 5] = 1, 2
  seg[1, :t - 1] = 1
  return jnp.asarray(seg)


def grads(fn, args):
  w = jax.random.normal(jax.random.key(4), args[0].shape)
  return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2)))(*args)


def test_xla_segments_equal_the_explicit_mask():
  """Forward and backward (the hand-written VJP) against autodiff of attention under the explicit mask."""
  t = 24
  q, k, v = qkv(t)
  seg = packed_segments(t)
  explicit = layers.segment_mask(seg) & jnp.tril(jnp.ones((t, t), bool))
  fn = lambda q, k, v: layers.attention(q, k, v, is_causal=True, segment_ids=seg, kernel='xla')
  ref_fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=explicit, implementation='xla')
  assert rel_err(jax.jit(fn)(q, k, v), jax.jit(ref_fn)(q, k, v)) <= 1e-6
  ours, ref = grads(fn, (q, k, v)), grads(ref_fn, (q, k, v))
  for g, g_ref in zip(ours[1], ref[1]):
    assert rel_err(g, g_ref) <= 1e-5


def test_splash_kernel_with_segments_equals_xla():
  """The TPU kernel itself, run by the Pallas interpreter on CPU (its Mosaic compilation needs a TPU)."""
  t = layers.SPLASH_BLOCK * 2
  q, k, v = qkv(t, b=1)
  seg = packed_segments(t)[:1]
  splash = grads(lambda q, k, v: layers.splash_attention(q, k, v, is_causal=True, segment_ids=seg, interpret=True),
                 (q, k, v))
  xla = grads(lambda q, k, v: layers.attention(q, k, v, is_causal=True, segment_ids=seg, kernel='xla'), (q, k, v))
  assert rel_err(splash[0], xla[0]) <= 1e-5
  for g, g_ref in zip(splash[1], xla[1]):
    assert rel_err(g, g_ref) <= 1e-5


def test_cudnn_kernel_falls_back_to_xla_where_cudnn_is_missing():
  """kernel='cudnn' on a machine without cuDNN declines, and the XLA formulation answers with the same numbers."""
  q, k, v = qkv(16)
  seg = packed_segments(16)
  run = lambda kernel: jax.jit(lambda q, k, v: layers.attention(q, k, v, is_causal=True, segment_ids=seg,
                                                                 kernel=kernel))(q, k, v)
  assert np.array_equal(np.asarray(run('cudnn')), np.asarray(run('xla')))


@pytest.mark.parametrize('packed', [True, False])
def test_cudnn_kernel_gets_causal_and_a_full_mask(monkeypatch, packed):
  """What reaches jax.nn.dot_product_attention(implementation='cudnn'): is_causal (cuDNN's own causal mask) and
  segments or key padding as a [batch, 1, q_len, kv_len] mask (its bias must span both lengths)."""
  q, k, v = qkv(16)
  seg = packed_segments(16)
  seen, real = {}, jax.nn.dot_product_attention

  def fake(q, k, v, mask=None, *, is_causal=False, implementation=None):
    seen.update(shape=mask.shape, is_causal=is_causal, implementation=implementation)
    return real(q, k, v, mask=mask, is_causal=is_causal, implementation='xla')

  monkeypatch.setattr(layers.jax.nn, 'dot_product_attention', fake)
  if packed:
    out = layers.attention(q, k, v, is_causal=True, segment_ids=seg, kernel='cudnn')
  else:
    out = layers.attention(q, k, v, (seg > 0)[:, None, None, :], is_causal=True, kernel='cudnn')
  assert seen == {'shape': (2, 1, 16, 16), 'is_causal': True, 'implementation': 'cudnn'}
  monkeypatch.undo()
  mask = layers.segment_mask(seg) if packed else (seg > 0)[:, None, None, :]
  ref = layers.attention(q, k, v, mask, is_causal=True, kernel='xla')
  assert rel_err(out, ref) <= 1e-6


def test_splash_kernel_runs_per_shard_under_a_mesh():
  """Under a (data 2, fsdp 2, tensor 2) mesh the Pallas call runs in a shard_map (batch over data x fsdp, heads
  over tensor) and gives the single-device numbers."""
  from llava_jax import sharding
  t = layers.SPLASH_BLOCK
  q, k, v = qkv(t, b=4)
  seg = jnp.asarray(np.repeat(np.arange(1, 5), t // 4)[None].repeat(4, 0), jnp.int32)
  fn = lambda q, k, v: layers.splash_attention(q, k, v, is_causal=True, segment_ids=seg, interpret=True)
  mesh = sharding.make_mesh((2, 2, 2), jax.devices()[:8])
  with sharding.activation_rules(mesh):
    sharded = jax.jit(fn)
    assert 'shard_map' in str(sharded.trace(q, k, v).jaxpr)
    out = sharded(q, k, v)
  ref = layers.attention(q, k, v, is_causal=True, segment_ids=seg, kernel='xla')
  assert rel_err(out, ref) <= 1e-5
