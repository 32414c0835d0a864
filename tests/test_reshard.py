"""Resharding restore: a training checkpoint or an exported model written on one mesh restores on another.

Written on 8-way FSDP (mesh data=1, fsdp=8, tensor=1); restored on 2 data x 4 tensor and on a single device,
bit-exact and placed with the target mesh's shardings. (A checkpoint written by 2 processes resuming in one:
tests/test_multihost.py.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from llava_jax import model_dir, sharding
from llava_jax.models import presets
from llava_jax.models.llava import abstract_params
from llava_jax.train import partition, resume
from llava_jax.train import optim as optim_lib
from llava_jax.train import setup as setup_lib
from llava_jax.train.step import TrainState

MODEL = presets.get_model_config('tiny')
MESHES = {'fsdp8': ((1, 8, 1), 8), 'data2_tensor4': ((2, 1, 4), 8), 'one_device': ((1, 1, 1), 1)}
STAGES = {'stage1': common.STAGE1_TRAINABLE, 'stage2': common.STAGE2_TRAINABLE}


def mesh(name):
  shape, n = MESHES[name]
  return sharding.make_mesh(shape, jax.devices()[:n])


def abstract_state(stage, mesh_name):
  """TrainState of ShapeDtypeStructs carrying `mesh_name`'s shardings (what the trainer restores into)."""
  m = mesh(mesh_name)
  mask = partition.trainable_paths(abstract_params(MODEL), STAGES[stage])
  trainable, _ = setup_lib.abstract_split(MODEL, mask, m)
  tx, _ = optim_lib.make_optimizer(common.stage_config('tiny').optim, 100, trainable)
  rep = sharding.replicated(m)
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=trainable,
                    opt_state=setup_lib.opt_state_shardings(tx, trainable, m))


def random_like(abstract, seed=0):
  """Distinct random values in every leaf, placed with the leaf's sharding."""
  rng = np.random.default_rng(seed)
  def one(a):
    if jnp.issubdtype(a.dtype, jnp.floating):
      value = rng.standard_normal(a.shape).astype(a.dtype)
    else:
      value = rng.integers(0, 1000, a.shape).astype(a.dtype)
    return jax.device_put(value, a.sharding)
  return jax.tree.map(one, abstract)


def assert_same(restored, original, target):
  assert jax.tree.structure(restored) == jax.tree.structure(original)
  for r, o, t in zip(jax.tree.leaves(restored), jax.tree.leaves(original), jax.tree.leaves(target)):
    np.testing.assert_array_equal(np.asarray(r), np.asarray(o))
    assert r.sharding.is_equivalent_to(t.sharding, r.ndim), (r.sharding, t.sharding)


@pytest.fixture(scope='module', params=list(STAGES))
def saved_training_checkpoint(request, tmp_path_factory):
  """A training checkpoint (step 3) written from the FSDP-8 mesh."""
  stage = request.param
  state = random_like(abstract_state(stage, 'fsdp8'))
  directory = str(tmp_path_factory.mktemp(f'ckpt_{stage}'))
  ckpts = resume.Checkpoints(directory, keep=1, async_save=True)
  ckpts.save(3, state, {'inner': {'next_index': 3}})
  ckpts.close()
  return stage, directory, jax.device_get(state)


@pytest.mark.parametrize('target', ['data2_tensor4', 'one_device', 'fsdp8'])
def test_training_checkpoint_restores_on_another_mesh(saved_training_checkpoint, target):
  stage, directory, original = saved_training_checkpoint
  abstract = abstract_state(stage, target)
  ckpts = resume.Checkpoints(directory, keep=1, async_save=True)
  try:
    assert ckpts.latest_step() == 3
    restored, data_state = ckpts.restore(3, abstract)
  finally:
    ckpts.close()
  assert data_state == {'inner': {'next_index': 3}}
  assert_same(restored, original, abstract)
  if target == 'data2_tensor4' and stage == 'stage2':  # the tensor axis really splits some weights
    specs = [x.sharding.spec for x in jax.tree.leaves(restored.params)]
    assert any('tensor' in jax.tree.leaves(tuple(s)) for s in specs)


def test_exported_model_restores_on_another_mesh(tmp_path):
  written_on = mesh('fsdp8')
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(MODEL), setup_lib.param_shardings(MODEL, written_on))
  params = random_like(abstract, seed=1)
  assert any(x.sharding.spec != P() for x in jax.tree.leaves(params))  # really sharded when written
  model_dir.save_model(str(tmp_path / 'model'), MODEL, params, template='vicuna_v1')
  original = jax.device_get(params)
  target = setup_lib.param_shardings(MODEL, mesh('data2_tensor4'))
  m = model_dir.load_model(str(tmp_path / 'model'), shardings=target)
  assert m.config == MODEL and m.template == 'vicuna_v1' and m.tokenizer is None
  assert_same(m.params, original, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                               abstract_params(MODEL), target))
  single = model_dir.load_model(str(tmp_path / 'model')).params
  for r, o in zip(jax.tree.leaves(single), jax.tree.leaves(original)):
    np.testing.assert_array_equal(np.asarray(r), o)
    assert len(r.sharding.device_set) == 1
