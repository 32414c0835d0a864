"""The train step on its own (no data pipeline): stage masks, accumulation, sharding parity, loss, NaN guard, FLOPs.

Tiny model (`presets tiny`: 3-block ViT on 32 px, 2-layer LLaMA, vocab 512), fp32 unless bf16 is what is tested.
Every compiled step is built once per module (fixtures) and reused.
"""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from llava_jax import sharding  # noqa: E402
from llava_jax.models import presets  # noqa: E402
from llava_jax.models.llava import abstract_params, init_params  # noqa: E402
from llava_jax.train import flops, partition  # noqa: E402
from llava_jax.train import setup as setup_lib  # noqa: E402
from llava_jax.train.optim import make_optimizer  # noqa: E402
from llava_jax.train.step import batch_work, next_token_loss  # noqa: E402

STAGE1 = (('projector/.*', True), ('.*', False))
STAGE2 = (('projector/.*', True), ('language_model/.*', True), ('.*', False))
BATCH, SEQ = 8, 40
LR = 1e-3
# Params after Adam: the update g / (sqrt(v) + eps) turns last-bit differences of near-zero gradients (summation
# order) into up to a few % of lr, so params are compared at PARAM_ATOL; losses are compared at 1e-5.
PARAM_ATOL = 0.05 * LR


def optim(**kw):
  d = dict(lr=LR, projector_lr=None, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, warmup_ratio=0.0,
           schedule='cosine', clip_norm=1.0)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def mesh_of(shape, n):
  return sharding.make_mesh(shape, devices=jax.devices()[:n])


def make_batch(cfg, seed, batch=BATCH, seq=SEQ):
  """Samples with an image (16 tokens after BOS) and text-only ones, and uneven numbers of supervised tokens."""
  rng = np.random.default_rng(seed)
  n = cfg.num_image_tokens
  ids = rng.integers(5, cfg.text.vocab_size, (batch, seq)).astype(np.int32)
  labels = np.full((batch, seq), -100, np.int32)
  mask = np.zeros((batch, seq), np.int32)
  for i in range(batch):
    length = int(rng.integers(n + 4, seq + 1))
    mask[i, :length] = 1
    ids[i, length:] = 0
    start = 1
    if i % 3 != 2:  # every third sample is text-only
      ids[i, 1:1 + n] = cfg.image_token_id
      start = 1 + n
    ids[i, start:length][ids[i, start:length] == cfg.image_token_id] = 7
    first = int(rng.integers(start, length - 1))
    labels[i, first:length] = ids[i, first:length]
  pix = rng.normal(size=(batch, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  return {'input_ids': ids, 'labels': labels, 'attention_mask': mask, 'pixel_values': pix}


def run_steps(setup, params, batches):
  state, frozen = setup_lib.init_state(setup, params)
  losses = []
  for b in batches:
    state, m = setup.step(state, frozen, setup_lib.make_global_batch(setup, b))
    losses.append(float(m['loss']))
  return state, frozen, losses


@pytest.fixture(scope='module')
def cfg():
  return presets.get_model_config('tiny')


@pytest.fixture(scope='module')
def params(cfg):
  return jax.device_get(init_params(cfg, jax.random.key(1)))


@pytest.fixture(scope='module')
def batches(cfg):
  return [make_batch(cfg, s) for s in range(3)]


@pytest.fixture(scope='module')
def stage2_one_device(cfg, params, batches):
  setup = setup_lib.create(cfg, STAGE2, optim(), 10, mesh_of((1, 1, 1), 1), global_batch=BATCH, seq_len=SEQ)
  state, frozen, losses = run_steps(setup, params, batches)
  return setup, state, frozen, losses


def _changed(before, after):
  flat_b, flat_a = partition.flatten(before), partition.flatten(after)
  return {k for k in flat_a if not np.array_equal(np.asarray(flat_b[k], np.float32), np.asarray(flat_a[k], np.float32))}


def _opt_param_paths(opt_state):
  """'/'-paths of the param-shaped leaves in the optimizer state (the Adam moments)."""
  paths = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if keys and leaf.ndim > 0:
      paths.add('/'.join(keys))
  return paths


def test_stage1_trains_only_the_projector_and_frozen_weights_are_bf16(cfg, params, batches):
  bf16 = cfg.replace(dtype='bfloat16')
  setup = setup_lib.create(bf16, STAGE1, optim(), 10, mesh_of((1, 1, 1), 1), global_batch=BATCH, seq_len=SEQ)
  state, frozen = setup_lib.init_state(setup, params)
  before = jax.device_get(partition.merge(state.params, frozen))
  assert set(state.params) == {'projector'}
  assert set(frozen) == {'vision_tower', 'language_model'}
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype('bfloat16')}
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype('float32')}
  # Optimizer state: exactly the projector's leaves (mu and nu), nothing for the frozen modules.
  projector_leaves = set(partition.flatten(state.params))
  assert _opt_param_paths(state.opt_state) == projector_leaves
  n_proj = sum(x.size for x in jax.tree.leaves(state.params))
  assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0) == 2 * n_proj
  state, m = setup.step(state, frozen, setup_lib.make_global_batch(setup, batches[0]))
  after = jax.device_get(partition.merge(state.params, frozen))
  changed = _changed(before, after)
  assert changed == {k for k in partition.flatten(after) if k.startswith('projector/')}
  assert int(m['finite']) == 1 and int(state.step) == 1


def test_stage2_trains_projector_and_llm_never_the_encoder(stage2_one_device, params):
  _, state, frozen, _ = stage2_one_device
  assert set(state.params) == {'projector', 'language_model'} and set(frozen) == {'vision_tower'}
  after = jax.device_get(partition.merge(state.params, frozen))
  changed = _changed(params, after)
  flat = partition.flatten(after)
  assert not any(k.startswith('vision_tower/') for k in changed)
  assert changed == {k for k in flat if k.startswith(('projector/', 'language_model/'))}
  assert _opt_param_paths(state.opt_state) == set(partition.flatten(state.params))


def test_gradient_accumulation_equals_one_big_batch(cfg, params, batches, stage2_one_device):
  _, big_state, _, big_losses = stage2_one_device
  setup = setup_lib.create(cfg, STAGE2, optim(), 10, mesh_of((1, 1, 1), 1), global_batch=BATCH, seq_len=SEQ,
                           grad_accum_steps=4)
  state, _, losses = run_steps(setup, params, batches)
  np.testing.assert_allclose(losses, big_losses, rtol=0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(big_state.params))):
    np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL)


@pytest.mark.parametrize('shape', [(1, 8, 1), (2, 1, 4)], ids=['fsdp8', 'data2_tensor4'])
def test_eight_devices_match_one_device(cfg, params, batches, stage2_one_device, shape):
  _, ref_state, _, ref_losses = stage2_one_device
  setup = setup_lib.create(cfg, STAGE2, optim(), 10, mesh_of(shape, 8), global_batch=BATCH, seq_len=SEQ)
  specs = [s.spec for s in jax.tree.leaves(setup.state_shardings.params)]
  axis = 'fsdp' if shape[1] > 1 else 'tensor'
  assert any(axis in str(s) for s in specs), f'no param is sharded over {axis}: {specs}'
  state, _, losses = run_steps(setup, params, batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(ref_state.params))):
    np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL)


def test_non_finite_step_leaves_the_state_unchanged(stage2_one_device, batches):
  setup, state, frozen, _ = stage2_one_device
  before = jax.device_get(state)
  bad = dict(batches[0], pixel_values=np.full_like(batches[0]['pixel_values'], np.nan))
  new, m = setup.step(state, frozen, setup_lib.make_global_batch(setup, bad))
  assert int(m['finite']) == 0 and not np.isfinite(float(m['loss']))
  after = jax.device_get(new)
  for a, b in zip(jax.tree.leaves(before.params) + jax.tree.leaves(before.opt_state),
                  jax.tree.leaves(after.params) + jax.tree.leaves(after.opt_state)):
    np.testing.assert_array_equal(a, b)
  assert int(after.step) == int(before.step) + 1


def test_next_token_loss_shifts_and_ignores():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  labels = np.array([[-100, 3, 4, -100, 6], [-100, -100, -100, 1, -100]], np.int32)
  total, count = next_token_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
  lg = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
  expect = 0.0
  for b, t in [(0, 1), (0, 2), (0, 4), (1, 3)]:  # label at t is predicted at t - 1
    row = lg[b, t - 1]
    expect += np.log(np.exp(row - row.max()).sum()) + row.max() - row[labels[b, t]]
  assert int(count) == 4
  np.testing.assert_allclose(float(total), expect, rtol=1e-6)


def test_optimizer_decays_only_matrices_and_uses_projector_lr():
  params = {'projector': {'linear_1': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}},
            'language_model': {'norm': {'scale': jnp.ones(2)}, 'lm_head': {'kernel': jnp.ones((2, 2))}}}
  zero = jax.tree.map(jnp.zeros_like, params)
  tx, _ = make_optimizer(optim(lr=0.1, projector_lr=0.01, weight_decay=0.5, clip_norm=0.0), 100, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  flat = partition.flatten(updates)
  # Zero gradient: the only update is decoupled weight decay, -lr * wd * w, on matrices only.
  np.testing.assert_allclose(flat['language_model/lm_head/kernel'], -0.1 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(flat['projector/linear_1/kernel'], -0.01 * 0.5, rtol=1e-6)
  assert not np.any(flat['projector/linear_1/bias']) and not np.any(flat['language_model/norm/scale'])


def test_warmup_cosine_schedule():
  _, lr = make_optimizer(optim(lr=1.0, warmup_ratio=0.1), 100, {'w': jnp.ones((2, 2))})
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0) and float(lr(55)) == pytest.approx(0.5, abs=1e-6)
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-7)


def test_flops_count_only_what_is_differentiated(cfg):
  shapes = abstract_params(cfg)
  flat = partition.flatten(shapes)
  n = lambda prefix: sum(np.prod(v.shape) for k, v in flat.items()
                         if k.startswith(prefix) and flops._is_matmul(k) and 'unused_layers' not in k)
  mask_of = lambda rules: partition.trainable_paths(shapes, rules)
  b, s = 2, 64
  t = cfg.text
  llm_tokens, attn = b * s, 4 * t.num_layers * t.num_heads * t.dim_per_head * s
  v = cfg.vision
  vis_tokens, vis_attn = b * (v.num_patches + 1), 4 * v.num_layers_used * v.hidden_size * (v.num_patches + 1)
  proj_tokens = b * cfg.num_image_tokens
  stage1 = flops.step_flops(cfg, mask_of(STAGE1), shapes, b, s, b)
  expect1 = ((2 * n('vision_tower') + vis_attn) * vis_tokens + 6 * n('projector') * proj_tokens
             + (4 * n('language_model') + 3 * attn) * llm_tokens)
  assert stage1 == pytest.approx(expect1)
  stage2 = flops.step_flops(cfg, mask_of(STAGE2), shapes, b, s, b)
  assert stage2 - stage1 == pytest.approx(2 * n('language_model') * llm_tokens)


def test_batch_work_counts_real_tokens_samples_and_attention_per_sample(cfg):
  """Unpacked rows (lengths 5 and 3 of 8, one image) and the same samples packed in one row (two image slots, one
  used): the same work, padding excluded; attention pairs per sample 5^2 + 3^2."""
  ids = np.full((2, 8), 7, np.int32)
  ids[0, 1] = cfg.image_token_id
  unpacked = {'input_ids': ids, 'attention_mask': np.array([[1] * 5 + [0] * 3, [1] * 3 + [0] * 5], np.int32),
              'pixel_values': np.zeros((2, 4, 4, 3), np.float32)}
  packed = {'input_ids': ids[:1], 'segment_ids': np.array([[1] * 5 + [2] * 3]), 'positions': np.array([[0, 1, 2, 3, 4,
            0, 1, 2]]), 'pixel_values': np.zeros((1, 2, 4, 4, 3), np.float32), 'image_valid': np.array([[True, False]])}
  expect = {'real_tokens': 8, 'samples': 2, 'images': 1, 'attention_pairs': 34}
  for batch in (unpacked, packed):
    assert {k: float(v) for k, v in batch_work(batch, cfg.image_token_id).items()} == expect
  shapes = abstract_params(cfg)
  mask = partition.trainable_paths(shapes, STAGE2)
  units = flops.unit_flops(cfg, mask, shapes)
  full = flops.step_flops(cfg, mask, shapes, 2, 8, 2)
  assert flops.work_flops(units, 16, 2 * 64, 2) == pytest.approx(full)
  assert flops.work_flops(units, 8, 34, 1) < 0.6 * full
