"""Metrics out of the loop: a progress line on the console, `metrics.jsonl` and TensorBoard event files.

Only process 0 writes or prints; other processes get no-op writers.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import tqdm

from llava_jax.train import flops

WORK_KEYS = ('real_tokens', 'samples', 'images', 'attention_pairs')  # train.step.batch_work


class Throughput:
  """Rates over a window of steps, counting real work only: tokens/s and samples/s without padding, MFU from
  the FLOPs of the real tokens, their per-sample attention and the used images (flops.work_flops), and the pad
  fraction of the rows beside them."""

  def __init__(self, units: dict[str, float], row_tokens: int, peak_flops: float):
    self.units, self.row_tokens, self.peak = units, row_tokens, peak_flops  # row_tokens: batch * seq per step
    self._reset()

  def _reset(self):
    self._t, self._steps, self._flops = time.perf_counter(), 0, 0.0
    self._work = dict.fromkeys(WORK_KEYS, 0.0)

  def add(self, step_metrics: dict[str, float]) -> None:
    self._steps += 1
    for k in WORK_KEYS:
      self._work[k] += step_metrics[k]
    w = {k: step_metrics[k] for k in WORK_KEYS}
    self._flops += flops.work_flops(self.units, w['real_tokens'], w['attention_pairs'], w['images'])

  def rates(self) -> dict[str, float]:
    """Since the last call: step_time_s, tokens_per_s, samples_per_s, pad_fraction, mfu."""
    dt = max(time.perf_counter() - self._t, 1e-9)
    n, w = max(self._steps, 1), self._work
    out = {'step_time_s': dt / n, 'tokens_per_s': w['real_tokens'] / dt, 'samples_per_s': w['samples'] / dt,
           'pad_fraction': 1.0 - w['real_tokens'] / (n * self.row_tokens), 'mfu': self._flops / dt / self.peak}
    self._reset()
    return out


class MetricsWriter:
  """Appends one JSON object per logged step to `<workdir>/metrics.jsonl` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._jsonl = self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    if tensorboard:
      from tensorboardX import SummaryWriter  # optional at import time: only when enabled
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class _Lines:
  """A stream for tqdm on a pipe: each redraw ('\\r' + status) becomes one line, so logs read line by line."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, s: str) -> None:
    s = s.replace('\r', '').rstrip()
    if s:
      self.stream.write(s + '\n')

  def flush(self) -> None:
    self.stream.flush()


class Progress:
  """A tqdm bar: `[stage] 120/1000 [####......]  12%, loss 2.3140 lr 1.90e-03 2,310 tok/s 9.1 samples/s pad 3%
  MFU 41.2% ETA 03:12` (tok/s and MFU without padding: see Throughput).

  Redraws in place on a terminal; on a pipe prints a line every `every` steps and at the end.
  """

  FORMAT = '{desc} {n_fmt}/{total_fmt} [{bar:20}] {percentage:3.0f}%{postfix} ETA {remaining}'

  def __init__(self, name: str, total: int, start: int = 0, every: int = 10, stream=None):
    stream = stream or sys.stdout
    self.every = every
    self.tty = hasattr(stream, 'isatty') and stream.isatty()
    # On a pipe tqdm never redraws by itself (mininterval=inf): `update` asks for a line every `every` steps.
    self._bar = tqdm.tqdm(total=total, initial=start, desc=f'[{name}]', bar_format=self.FORMAT, ascii='.#',
                          file=stream if self.tty else _Lines(stream), disable=jax.process_index() != 0,
                          mininterval=0.1 if self.tty else float('inf'), leave=self.tty)

  def update(self, step: int, metrics: dict[str, float], force: bool = False) -> None:
    parts = []
    if 'loss' in metrics:
      parts.append(f'loss {metrics["loss"]:.4f}')
    if 'lr' in metrics:
      parts.append(f'lr {metrics["lr"]:.2e}')
    if 'tokens_per_s' in metrics:
      parts.append(f'{metrics["tokens_per_s"]:,.0f} tok/s')
    if 'samples_per_s' in metrics:
      parts.append(f'{metrics["samples_per_s"]:,.1f} samples/s')
    if 'pad_fraction' in metrics:
      parts.append(f'pad {100 * metrics["pad_fraction"]:.0f}%')
    if 'mfu' in metrics:
      parts.append(f'MFU {100 * metrics["mfu"]:.1f}%')
    self._bar.set_postfix_str(' '.join(parts), refresh=False)
    self._bar.update(step - self._bar.n)
    if not self.tty and (force or step % self.every == 0 or step == self._bar.total):
      self._bar.refresh()

  def close(self) -> None:
    self._bar.close()


def log(message: str) -> None:
  """Print on process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)
