"""The worker of the multi-process tests: it runs the real trainer entry point.

  python tests/multihost_worker.py RECORD_DIR [python -m llava_jax.train arguments...]

The worker runs `llava_jax.train.__main__.main` unchanged (the same start-up from LLAVA_* env or flags, data
sharding, checkpoints and logging as a cluster job) and records which dataset records this process read
(`RECORD_DIR/process_<i>.jsonl`, the record ids of each batch).
"""
from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _RecordingPipeline:
  """Wraps the trainer's input iterator: appends the record ids of each batch this process takes to
  `<record_dir>/process_<i>.jsonl` (one line per step of this run), and SIGKILLs this process when it is about to
  take batch number `kill_at` of this run (env MULTIHOST_KILL_AT=PROCESS:CALL), like a host dying mid-run."""

  def __init__(self, inner, record_dir: str):
    self._inner, self._dir, self._calls = inner, record_dir, 0

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def __iter__(self):
    return self

  def __next__(self):
    import jax
    self._calls += 1
    kill = os.environ.get('MULTIHOST_KILL_AT')
    if kill and tuple(map(int, kill.split(':'))) == (jax.process_index(), self._calls):
      os.kill(os.getpid(), 9)
    batch = next(self._inner)
    with open(os.path.join(self._dir, f'process_{jax.process_index()}.jsonl'), 'a') as f:
      f.write(json.dumps({'call': self._calls, 'index': batch['index'].tolist()}) + '\n')
    return batch


def main(argv) -> int:
  record_dir, argv = argv[0], argv[1:]
  os.makedirs(record_dir, exist_ok=True)
  sys.path.insert(0, REPO)
  from llava_jax.train import __main__ as entry
  from llava_jax.train import trainer

  make_pipeline = trainer.make_pipeline
  trainer.make_pipeline = lambda *a, **k: _RecordingPipeline(make_pipeline(*a, with_index=True, **k), record_dir)
  return entry.main(argv)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
