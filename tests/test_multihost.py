"""Multi-process training over loopback: 2 processes x 4 CPU devices against 1 process x 8 devices.

One story, run once per module (the processes are real: jax.distributed, gloo collectives, per-process data):
  1. run A: 2 processes started by hand; process 1 is SIGKILLed as it takes its 5th batch; process 0 must exit
     non-zero on its own (jax's heartbeat) within 60 s;
  2. reference: meanwhile `trainer.train` here, 1 process x 8 devices, K=6 steps of configs/stage2_finetune.py:tiny;
  3. run B: the same command through launch/local_multiprocess.sh; it resumes from the last complete checkpoint
     and finishes;
  4. the 2-process checkpoint of step 4 resumes in this single process.
Losses and final params of A+B and of 4 must equal the reference's (1e-5); records per process are disjoint and
cover the epoch once. All runs pack rows (data.packing: about 2 samples per row of 128 tokens, 2 image slots), so
this is also the check that packing is the same over 2 processes as over 1.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from llava_jax import model_dir
from llava_jax.data.pipeline import make_pipeline
from llava_jax.train import cli, config_checks, trainer

import multihost_worker
from conftest import colour_dataset

REPO = multihost_worker.REPO
CONFIG = os.path.join(REPO, 'configs', 'stage2_finetune.py') + ':tiny'
STEPS, BATCH, RECORDS, PER_PROCESS = 6, 8, 40, 4
KILL_AT = 5  # process 1 dies as it takes batch 5; checkpoints are written every 2 steps
TOL = 1e-5


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  return colour_dataset(str(tmp_path_factory.mktemp('colors')), RECORDS, moving=True)


def overrides(dataset) -> dict:
  data_dir, tok_dir, image_id = dataset
  return {'data.train_dir': data_dir, 'data.tokenizer': tok_dir, 'model.image_token_id': image_id,
          'model.dtype': 'float32', 'model.remat_policy': 'none', 'init.allow_random_frozen': True,
          'data.global_batch_size': BATCH, 'train.steps': STEPS, 'checkpoint.every_steps': 2, 'checkpoint.keep': 2,
          'log.every_steps': 1, 'optim.lr': 1e-3, 'optim.warmup_ratio': 0.0, 'optim.schedule': 'constant',
          'log.tensorboard': False, 'log.peak_tflops': 1.0, 'data.packing': True, 'data.max_length': 128,
          'data.max_images_per_row': 2}


def trainer_args(dataset, workdir) -> list[str]:
  return ['--config', CONFIG, '--workdir', str(workdir)] + [f'--config.{k}={v}' for k, v in overrides(dataset).items()]


def load_config(dataset, workdir):
  config = cli.load(CONFIG, [f'{k}={v}' for k, v in overrides(dataset).items()], workdir=str(workdir))
  config_checks.validate(config, num_devices=jax.device_count())
  return config


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """The 2-process runs' own compilation cache (run B reuses run A's programs). Not conftest's: jax's cache key
  does not tell 2 processes x 4 CPU devices from 1 x 8, and a worker that loaded a 1-process program would hang."""
  return str(tmp_path_factory.mktemp('jax_cache_2_processes'))


def subprocess_env(cache_dir, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', JAX_COMPILATION_CACHE_DIR=cache_dir)
  env.pop('MULTIHOST_KILL_AT', None)
  env.update(extra)
  return env


def losses_by_step(workdir) -> dict[int, list[float]]:
  """metrics.jsonl (appended by every run in the workdir) -> step -> the losses logged for it, in order."""
  out = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    r = json.loads(line)
    out.setdefault(r['step'], []).append(r['loss'])
  return out


def records(record_dir, process) -> list[list[int]]:
  path = os.path.join(record_dir, f'process_{process}.jsonl')
  return [json.loads(line)['index'] for line in open(path)] if os.path.exists(path) else []


def exported(workdir):
  config, _ = model_dir.load_config(os.path.join(workdir, 'model'))
  return jax.device_get(model_dir.load_params(os.path.join(workdir, 'model'), config))


def complete_steps(workdir) -> list[int]:
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


def train_reference(dataset, workdir):
  result = trainer.train(load_config(dataset, workdir), str(workdir), log=lambda s: None)
  assert result['status'] == 'completed' and len(result['losses']) == STEPS
  return workdir, result['losses']


@pytest.fixture(scope='module')
def runs(dataset, cache_dir, tmp_path_factory):
  """Runs A (killed) and B (resumed), and the 1-process reference, trained here while run A's survivor waits for
  the heartbeat timeout. Returns a dict of what the tests check."""
  root = tmp_path_factory.mktemp('two_processes')
  workdir, rec_a, rec_b, logs_b = root / 'work', root / 'records_a', root / 'records_b', root / 'logs_b'
  worker = [sys.executable, os.path.join(REPO, 'tests', 'multihost_worker.py')]
  # --- run A: processes started by hand, so that nothing but jax notices the dead peer
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    env = subprocess_env(cache_dir, XLA_FLAGS='--xla_force_host_platform_device_count=4',
                         LLAVA_COORDINATOR=f'127.0.0.1:{port}', LLAVA_NUM_PROCESSES='2', LLAVA_PROCESS_ID=str(i),
                         MULTIHOST_KILL_AT=f'1:{KILL_AT}')
    with open(root / f'a_process_{i}.log', 'w') as log:
      procs.append(subprocess.Popen(worker + [str(rec_a)] + trainer_args(dataset, workdir), cwd=REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT))
  exits = {}

  def watch():  # exit times, taken while this process trains the reference
    for i in (1, 0):
      try:
        exits[i] = (procs[i].wait(timeout=300), time.monotonic())
      except subprocess.TimeoutExpired:
        procs[i].kill()
  watcher = threading.Thread(target=watch)
  watcher.start()
  try:
    reference = train_reference(dataset, tmp_path_factory.mktemp('one_process'))
  finally:
    watcher.join()
  assert exits[1][0] == -9, 'process 1 should have been SIGKILLed'
  rc0, survivor_s = exits[0][0], exits[0][1] - exits[1][1]
  log_a0 = open(root / 'a_process_0.log').read()
  after_a = complete_steps(workdir)
  # --- run B: the same command again, through the launcher
  out = subprocess.run(['bash', os.path.join(REPO, 'launch', 'local_multiprocess.sh'), '2', '--'] + worker +
                       [str(rec_b)] + trainer_args(dataset, workdir), cwd=REPO, capture_output=True, text=True,
                       env=subprocess_env(cache_dir, LLAVA_LOG_DIR=str(logs_b), LLAVA_DEVICES_PER_PROCESS='4'),
                       timeout=300)
  log_b = [open(logs_b / f'process_{i}.log').read() for i in range(2)]
  assert out.returncode == 0, out.stdout + out.stderr + log_b[0] + log_b[1]
  return dict(workdir=workdir, rc0=rc0, survivor_s=survivor_s, log_a0=log_a0, after_a=after_a, log_b=log_b,
              rec_a=[records(rec_a, p) for p in range(2)], rec_b=[records(rec_b, p) for p in range(2)],
              reference=reference)


@pytest.fixture(scope='module')
def two_processes(runs):
  return runs


@pytest.fixture(scope='module')
def reference(runs):
  return runs['reference']


def test_killed_peer_stops_the_other_within_60s(two_processes):
  r = two_processes
  assert r['rc0'] != 0
  assert r['survivor_s'] < 60, r['survivor_s']
  assert 'another task died' in r['log_a0'] or 'heartbeat' in r['log_a0'], r['log_a0'][-3000:]
  assert r['after_a'] and max(r['after_a']) < KILL_AT  # what run A left: complete checkpoints only


def test_rerun_resumes_from_the_last_complete_checkpoint(two_processes):
  r = two_processes
  last = max(r['after_a'])
  assert f"resumed from {r['workdir']}/checkpoints/{last}" in r['log_b'][0]
  assert complete_steps(r['workdir']) == [4, 6]  # keep=2; the partial checkpoint of run A was replaced
  assert not [d for d in os.listdir(r['workdir'] / 'checkpoints') if 'tmp' in d]
  # Run B took batches last+1..STEPS: the same record ids run A took for those steps.
  for p in range(2):
    assert len(r['rec_b'][p]) == STEPS - last
    redone = r['rec_a'][p][last:]
    assert r['rec_b'][p][:len(redone)] == redone


def test_two_processes_match_one_process(two_processes, reference):
  r = two_processes
  ref_dir, ref_losses = reference
  logged = losses_by_step(r['workdir'])
  assert sorted(logged) == list(range(1, STEPS + 1))
  for step, losses in logged.items():  # steps run twice (before and after the kill) gave the same loss
    np.testing.assert_allclose(losses, ref_losses[step - 1], atol=TOL, rtol=0)
  a, b = exported(r['workdir']), exported(ref_dir)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=TOL, rtol=0)


def test_each_process_reads_a_disjoint_shard_covering_the_epoch_once(two_processes, dataset, tmp_path):
  r = two_processes
  last = max(r['after_a'])
  by_step = [r['rec_a'][p][:last] + r['rec_b'][p] for p in range(2)]  # the batches that made the final model
  assert [len(s) for s in by_step] == [STEPS, STEPS]
  # The packed global batches as one process reading all rows (record ids per row).
  config = load_config(dataset, tmp_path)
  d, mc = config.data, config_checks.model_config(config)
  whole = make_pipeline(d.train_dir, split='train', tokenizer=trainer.load_tokenizer(d.tokenizer, mc), template=d.template,
                        num_image_tokens=mc.num_image_tokens, image_size=mc.vision.image_size, image_aspect=d.image_aspect,
                        max_length=d.max_length, global_batch_size=BATCH, seed=0, num_epochs=1, packing=True,
                        max_images_per_row=d.max_images_per_row, process_index=0, process_count=1, with_index=True)
  steps_per_epoch = whole.num_steps
  assert 1 < steps_per_epoch < STEPS  # about 2 samples per row: epochs of 3 steps
  for p in range(2):
    for step, batch in enumerate(whole):
      assert len(by_step[p][step]) == PER_PROCESS
      assert by_step[p][step] == batch['index'][p * PER_PROCESS:(p + 1) * PER_PROCESS].tolist()  # rows p*4..p*4+3
  assert whole.stats()['samples_per_row'] > 1.5
  epoch = [i for p in range(2) for rows in by_step[p][:steps_per_epoch] for row in rows for i in row if i >= 0]
  assert sorted(epoch) == list(range(RECORDS))  # disjoint, and together exactly the epoch


def test_only_process_0_writes_metrics_and_progress_every_process_logs(two_processes):
  r = two_processes
  log0, log1 = r['log_b']
  assert '[work] 6/6' in log0 and '[work]' not in log1  # the progress bar
  assert '[process 0/2] reads rows 0..3 of every global batch of 8' in log0
  assert '[process 1/2] reads rows 4..7 of every global batch of 8' in log1
  assert 'jax.distributed up' in log1
  b_lines = [json.loads(x)['step'] for x in open(r['workdir'] / 'metrics.jsonl')][-(STEPS - max(r['after_a'])):]
  assert b_lines == list(range(max(r['after_a']) + 1, STEPS + 1))  # one line per step, not one per process
  data_files = sorted(os.listdir(r['workdir'] / 'checkpoints' / '6' / 'data'))
  assert [f for f in data_files if f.endswith('.json')] == ['process_0-of-2.json', 'process_1-of-2.json']


def test_two_process_checkpoint_resumes_in_one_process(two_processes, reference, dataset, tmp_path):
  """The step-4 checkpoint of the 2-process run, resumed here (1 process, 8 devices): steps 5-6 and the final
  params equal the reference run's."""
  ref_dir, ref_losses = reference
  shutil.copytree(two_processes['workdir'] / 'checkpoints', tmp_path / 'checkpoints')
  shutil.rmtree(tmp_path / 'checkpoints' / '6')
  result = trainer.train(load_config(dataset, tmp_path), str(tmp_path), log=lambda s: None)
  assert result['status'] == 'completed' and result['step'] == STEPS
  np.testing.assert_allclose(result['losses'], ref_losses[4:], atol=TOL, rtol=0)
  for x, y in zip(jax.tree.leaves(exported(tmp_path)), jax.tree.leaves(exported(ref_dir))):
    np.testing.assert_allclose(x, y, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------- start-up settings (no processes)

def test_start_up_settings_from_flags_env_and_cluster(monkeypatch):
  from llava_jax import distributed
  for k in ('LLAVA_COORDINATOR', 'LLAVA_NUM_PROCESSES', 'LLAVA_PROCESS_ID', 'LLAVA_LOCAL_DEVICE_IDS', 'LLAVA_CLUSTER',
            'SLURM_NTASKS', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES',
            'MEGASCALE_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize() is False  # a plain run: nothing to start
  monkeypatch.setenv('LLAVA_COORDINATOR', '10.0.0.1:1234')
  monkeypatch.setenv('LLAVA_NUM_PROCESSES', '4')
  monkeypatch.setenv('LLAVA_LOCAL_DEVICE_IDS', '0,1')
  a = distributed.from_env(distributed.DistributedArgs(process_id=3))  # a flag wins, env fills the rest
  assert (a.coordinator, a.num_processes, a.process_id, list(a.local_device_ids)) == ('10.0.0.1:1234', 4, 3, [0, 1])
  with pytest.raises(ValueError, match=r"needs \['process_id'\]"):
    distributed.initialize()
  monkeypatch.setenv('LLAVA_PROCESS_ID', '4')
  with pytest.raises(ValueError, match=r'process_id=4 outside \[0, num_processes=4\)'):
    distributed.initialize()
  from absl import flags
  fv = flags.FlagValues()
  distributed.define_flags(fv)
  fv(['prog', '--coordinator', 'h:1', '--num_processes', '2', '--process_id', '1', '--local_device_ids', '2,3'])
  assert distributed.from_flags(fv) == distributed.DistributedArgs('h:1', 2, 1, [2, 3])
  assert distributed.detected_cluster() is None
  monkeypatch.setenv('SLURM_NTASKS', '16')
  monkeypatch.setenv('SLURM_JOB_ID', '77')
  assert distributed.detected_cluster() == 'slurm'
  monkeypatch.setenv('LLAVA_CLUSTER', 'none')
  assert distributed.detected_cluster() is None
  monkeypatch.setenv('LLAVA_CLUSTER', 'auto')
  assert distributed.detected_cluster() == 'auto'


@pytest.mark.parametrize('shape', [(1, 8, 1), (2, 1, 4), (1, 1, 8)])
def test_one_process_reads_every_row(shape):
  from llava_jax import distributed, sharding
  assert distributed.data_shard(sharding.make_mesh(shape), 16) == (0, 1)
