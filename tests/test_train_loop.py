"""The whole trainer on a tiny dataset: exact resume, SIGTERM checkpoint, NaN policies, export, metrics files.

Runs `configs/stage2_finetune.py:tiny` with overrides, on a 48-image colour dataset built in a temp dir with the
data package's ArrayRecord builder and a word-level tokenizer.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llava_jax import model_dir
from llava_jax.train import cli, config_checks, trainer

from conftest import colour_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE2_TINY = os.path.join(REPO, 'configs', 'stage2_finetune.py') + ':tiny'


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """(tfds dir, tokenizer dir, image token id) of a small question-answer set about a coloured square."""
  return colour_dataset(str(tmp_path_factory.mktemp('colors')), 48)


def overrides(dataset, **extra):
  data_dir, tok_dir, image_id = dataset
  out = {'data.train_dir': data_dir, 'data.tokenizer': tok_dir, 'model.image_token_id': image_id,
         'model.dtype': 'float32', 'model.remat_policy': 'none', 'init.allow_random_frozen': True,
         'data.global_batch_size': 8, 'train.steps': 6, 'checkpoint.every_steps': 2, 'log.every_steps': 2,
         'optim.lr': 1e-3, 'optim.warmup_ratio': 0.0, 'log.tensorboard': True,
         'optim.schedule': 'constant'}  # constant: the compiled step does not depend on train.steps
  out.update(extra)
  return [f'{k}={v}' for k, v in out.items()]


def load(dataset, workdir, **extra):
  config = cli.load(STAGE2_TINY, overrides(dataset, **extra), workdir=str(workdir))
  config_checks.validate(config, num_devices=jax.device_count())
  return config


def exported_params(workdir):
  config, _ = model_dir.load_config(os.path.join(workdir, 'model'))
  return jax.device_get(model_dir.load_params(os.path.join(workdir, 'model'), config))


@pytest.fixture(scope='module')
def uninterrupted(dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('full')
  config = load(dataset, workdir, **{'export.hf_dir': str(workdir / 'hf')})
  return workdir, trainer.train(config, str(workdir), log=lambda s: None)


def test_kill_and_resume_equals_uninterrupted_run(dataset, uninterrupted, tmp_path):
  full_dir, full = uninterrupted
  assert full['status'] == 'completed' and len(full['losses']) == 6
  first = trainer.train(load(dataset, tmp_path), str(tmp_path), stop_after=3, log=lambda s: None)
  assert first['status'] == 'preempted' and first['step'] == 3 and first['model_dir'] is None
  assert sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()) == [2, 3]
  second = trainer.train(load(dataset, tmp_path), str(tmp_path), log=lambda s: None)
  assert second['status'] == 'completed' and second['step'] == 6
  assert first['losses'] + second['losses'] == full['losses']  # bitwise, CPU is deterministic
  a, b = exported_params(full_dir), exported_params(tmp_path)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  steps = [json.loads(line)['step'] for line in open(tmp_path / 'metrics.jsonl')]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tensorboard'))


def test_export_and_metrics(uninterrupted, dataset):
  workdir, full = uninterrupted
  config, template = model_dir.load_config(os.path.join(workdir, 'model'))
  assert template == 'vicuna_v1' and config.image_token_id == dataset[2]
  assert model_dir.load_tokenizer(os.path.join(workdir, 'model')).convert_tokens_to_ids('<image>') == dataset[2]
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['loss'] for r in records] == full['losses']
  logged = [r for r in records if 'mfu' in r]
  assert [r['step'] for r in logged] == [2, 4, 6]
  assert all(r['tokens_per_s'] > 0 and r['samples_per_s'] > 0 and 0 < r['mfu'] < 1 for r in logged)
  assert all(0 < r['pad_fraction'] < 1 for r in logged)  # short questions in padded rows
  assert full['losses'][-1] < full['losses'][0]
  assert sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()) == [4, 6]  # keep=2


def test_rerun_of_a_finished_stage_does_nothing(dataset, uninterrupted):
  workdir, full = uninterrupted
  again = trainer.train(load(dataset, workdir), str(workdir), log=lambda s: None)
  assert again['status'] == 'completed' and again['step'] == 6 and again['losses'] == []


@pytest.mark.parametrize('policy', ['stop', 'skip'])
def test_non_finite_loss_stops_without_writing_a_nan_checkpoint(dataset, tmp_path, policy):
  # lr 1e37 makes the weights overflow after the first update: step 2 on is non-finite.
  config = load(dataset, tmp_path, **{'optim.lr': 1e37, 'checkpoint.every_steps': 1, 'train.nan_policy': policy,
                                      'train.max_skipped_steps': 2, 'optim.clip_norm': 0.0})
  with pytest.raises(trainer.TrainingDiverged) as e:
    trainer.train(config, str(tmp_path), log=lambda s: None)
  bad_step = 2 if policy == 'stop' else 4  # 'skip': steps 2 and 3 skipped, the third in a row stops
  assert f'non-finite loss or gradient at step {bad_step}' in str(e.value)
  assert f'last good checkpoint: step {bad_step - 1} in {tmp_path}/checkpoints' in str(e.value)
  saved = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit())
  assert saved[-1] == bad_step - 1
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['skipped'] for r in records] == [0.0] + [1.0] * (bad_step - 1)


def test_sigterm_saves_a_checkpoint_and_exits_143(dataset, tmp_path):
  args = [sys.executable, '-m', 'llava_jax.train', '--config', STAGE2_TINY, '--workdir', str(tmp_path)]
  args += ['--config.' + o for o in overrides(dataset, **{'train.steps': 100000, 'checkpoint.every_steps': 100000,
                                                          'log.tensorboard': False})]
  # This process's 8 devices and compilation cache (conftest): the step compiled for the runs above is read back.
  proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics_file = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics_file.exists() and metrics_file.read_text().count('\n') >= 2:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stdout.read()
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 143, out
  last = json.loads(metrics_file.read_text().splitlines()[-1])['step']
  assert f'stopping at step {last}' in out
  assert [int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()] == [last]


def test_init_from_exported_and_hf_directories(dataset, uninterrupted, tmp_path):
  """Stage-2 style init: projector from our export, encoder and LLM from the HF export of the same model."""
  from llava_jax import sharding
  from llava_jax.train import init as init_lib
  from llava_jax.train import partition
  from llava_jax.train import setup as setup_lib
  workdir, _ = uninterrupted
  hf, ours = str(workdir / 'hf'), str(workdir / 'model')
  assert os.path.isfile(os.path.join(hf, 'config.json'))
  config = load(dataset, tmp_path, **{'init.vision_from': hf, 'init.llm_from': hf, 'init.projector_from': ours,
                                      'init.allow_random_frozen': False})
  model_config = config_checks.model_config(config)
  setup = setup_lib.create(model_config, config.train.trainable, config.optim, 6, sharding.make_mesh((1, -1, 1)),
                           global_batch=8, seq_len=config.data.max_length, compile=False)
  logs = []
  trainable, frozen = init_lib.initial_params(config.init, model_config, setup.mask, setup.abstract_state.params,
                                              setup.abstract_frozen, seed=5, log=logs.append)
  assert logs == [f'init: vision_tower <- {hf} (init.vision_from)', f'init: language_model <- {hf} (init.llm_from)',
                  f'init: projector <- {ours} (init.projector_from)']
  got = partition.flatten(jax.device_get(partition.merge(trainable, frozen)))
  want = partition.flatten(exported_params(workdir))
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_init_grows_the_vocabulary_like_resize_token_embeddings():
  from llava_jax.train.init import _place
  target = jax.numpy.full((6, 3), 7.0)
  out = np.asarray(_place(np.ones((4, 3), np.float32), target, 'language_model/embed_tokens/embedding', 'src'))
  assert (out[:4] == 1).all() and (out[4:] == 7).all()
  head = np.asarray(_place(np.ones((3, 4), np.float32), jax.numpy.zeros((3, 6)), 'language_model/lm_head/kernel',
                           'src'))
  assert (head[:, :4] == 1).all() and (head[:, 4:] == 0).all()
  with pytest.raises(ValueError, match=r'src: param language_model/norm/scale has shape \(4,\), the configured'):
    _place(np.ones(4, np.float32), jax.numpy.zeros(3), 'language_model/norm/scale', 'src')
