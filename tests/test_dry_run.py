"""`python -m llava_jax.train --config ... --dry_run`: the LLaVA-1.5 7B stage-2 job on 8x H100 sized on this CPU.

The full 7B config compiles for 8 simulated devices in a subprocess whose memory stays far below the 13 GiB its
bf16 weights alone would take (nothing is allocated); the printed per-device bytes match the parameter count.
"""
import os
import re
import subprocess
import sys
import time

import jax
import psutil
import pytest

from llava_jax.train import dry_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
# LLaVA-1.5-7B stage 2 trains the projector and the LLM (vocab 32064 with <image>, d 4096, MLP 11008, 32 layers).
D, F, V, L = 4096, 11008, 32064, 32
LLM = 2 * V * D + L * (4 * D * D + 3 * D * F + 2 * D) + D
PROJECTOR = 1024 * D + D + D * D + D


def gib(out: str, label: str) -> float:
  m = re.search(re.escape(label) + r'.*?\s+([0-9.]+)\s*$', out, re.MULTILINE)
  assert m, f'{label!r} not in:\n{out}'
  return float(m.group(1))


@pytest.fixture(scope='module')
def seven_b():
  """(stdout, exit status, peak RSS bytes) of the dry run of configs/scale.py:7b_stage2_8xh100."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.pop('XLA_FLAGS', None)  # the dry run picks its own device count
  proc = subprocess.Popen([sys.executable, '-m', 'llava_jax.train', '--config', 'configs/scale.py:7b_stage2_8xh100',
                           '--dry_run'], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  peak, ps = 0, psutil.Process(proc.pid)
  while proc.poll() is None:
    try:
      peak = max(peak, ps.memory_info().rss)
    except psutil.NoSuchProcess:
      break
    time.sleep(0.1)
  out = proc.stdout.read()
  return out, proc.wait(), peak


def test_7b_stage2_dry_run_prints_its_table(seven_b):
  out, status, _ = seven_b
  assert status == 0, out
  assert 'compiled for 8 cpu devices' in out
  assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in out
  assert 'global batch 128 = 8 x 8 rows x 2 micro-batch(es), seq 2048; remat full; compute bfloat16' in out
  assert re.search(rf'^total\s+{LLM + PROJECTOR:,}\s', out, re.MULTILINE)  # trainable params of the param table
  # FSDP over 8 devices: fp32 master weights and two AdamW moments, an eighth each (norm scales replicated).
  assert gib(out, 'trainable params (fp32 master)') == pytest.approx(4 * (LLM + PROJECTOR) / 8 / GiB, abs=0.01)
  assert gib(out, 'optimizer state (AdamW moments)') == pytest.approx(2 * 4 * (LLM + PROJECTOR) / 8 / GiB, abs=0.01)
  peak = gib(out, 'peak = arguments + outputs - aliased + temps')
  arguments = gib(out, '  arguments')
  assert arguments >= gib(out, 'trainable params') + gib(out, 'optimizer state') - 0.02
  assert arguments < peak < 80
  assert re.search(r'verdict: FITS: needs [0-9.]+ GiB per device .* of 80 GiB HBM', out)


def test_dry_run_allocates_no_weights(seven_b):
  _, status, peak_rss = seven_b
  assert status == 0
  assert peak_rss < 3 * GiB, peak_rss / GiB  # the bf16 weights alone are 13 GiB


def test_dry_run_says_when_it_does_not_fit():
  """The tiny stage-2 config on this process's 8 CPU devices against a 1 MiB 'HBM'."""
  import ml_collections
  from llava_jax.train import cli
  config = cli.load('configs/stage2_finetune.py:tiny', ['mesh.shape=(1,8,1)'])
  with config.unlocked():
    config.hardware = ml_collections.ConfigDict(dict(name='a 1 MiB device', devices=8, hbm_gib=1 / 1024))
  dry_run.check(config, 8)
  lines = []
  result = dry_run.dry_run(config, devices=jax.devices()[:8], log=lines.append)
  out = '\n'.join(lines)
  assert result['fits'] is False and 'verdict: DOES NOT FIT' in out and 'to fit: raise' in out
  assert result['compiled_peak'] > 1 * 2**20
  assert result['optimizer_state'] == pytest.approx(2 * result['trainable_params'], rel=0.01)  # AdamW: mu, nu


def test_dry_run_reports_bad_config():
  from llava_jax.train import cli
  assert dry_run.main(cli.load('configs/scale.py:7b_stage2_8xh100', ['mesh.shape=(1,3,1)'])) == 1
