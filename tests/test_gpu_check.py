"""bench/gpu_check.py in its --smoke mode (tiny model, CPU): the checks run and judge, with numbers.

On a GPU the same script checks the cuDNN kernel and measures MFU at seq 2048; here the expected kernel is XLA.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))

import gpu_check  # noqa: E402


@pytest.fixture(scope='module')
def result():
  return gpu_check.run(gpu_check.parse_args(['--smoke']))


def test_smoke_checks_pass_with_numbers(result):
  assert result['ok'] and result['backend'] == 'cpu' and result['expected_kernel'] == 'xla'
  p = result['parity']
  assert 0 < p['logits_rel_err'] <= gpu_check.LOGITS_TOL and p['loss_rel_err'] <= gpu_check.LOSS_TOL
  assert result['cudnn_calls'] == {'unpacked': 0, 'packed': 0}
  unpacked, packed = result['steps']['unpacked'], result['steps']['packed']
  assert packed['pad_fraction'] < 0.05 < unpacked['pad_fraction']  # the same length mix, packed and not
  assert packed['samples_per_row'] > 2 * unpacked['samples_per_row'] == 2.0
  assert all(0 < s['mfu'] < 1 and s['tokens_per_s'] > 0 for s in (unpacked, packed))


def test_kernel_verdict():
  assert gpu_check.kernel_verdict('cudnn', {'unpacked': 4, 'packed': 4})
  assert not gpu_check.kernel_verdict('cudnn', {'unpacked': 4, 'packed': 0})  # one step fell back to XLA
  assert gpu_check.kernel_verdict('xla', {'unpacked': 0, 'packed': 0})
  assert not gpu_check.kernel_verdict('xla', {'unpacked': 2, 'packed': 0})
