"""Resumable training checkpoints: orbax CheckpointManager over `<workdir>/checkpoints/<step>/`.

Each checkpoint holds `state` (step, trainable params, optimizer state: enough to continue bit-exactly; frozen
params are rebuilt from `config.init`) and `data` (every process's input-iterator state, one JSON file per process).
Saves are asynchronous; the arrays are copied off the device before `save` returns, so the next step may reuse
(donate) their buffers. The exported model (`llava_jax/model_dir.py`) is a separate, final artefact.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import threading
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath


def _process_file(directory: epath.Path) -> epath.Path:
  return directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'


class DataStateHandler(ocp.CheckpointHandler):
  """Per-process input pipeline state (like grain's handler, but for any get_state() value: JSON or bytes)."""

  def save(self, directory: epath.Path, args: 'DataStateSave'):
    state = args.state
    payload = {'bytes': base64.b64encode(state).decode()} if isinstance(state, bytes) else {'json': state}
    _process_file(directory).write_text(json.dumps(payload))

  def restore(self, directory: epath.Path, args: Optional['DataStateRestore'] = None):
    path = _process_file(directory)
    if not path.exists():
      # Written by a different number of processes. The pipeline counts its position in global steps (batches
      # depend only on seed, epoch and step), so process 0's state resumes the same global batches here.
      others = sorted(directory.glob('process_0-of-*.json'))
      if not others:
        raise FileNotFoundError(f'{path} missing and no process_0-of-*.json to resume the data position from')
      path = others[0]
    payload = json.loads(path.read_text())
    return base64.b64decode(payload['bytes']) if 'bytes' in payload else payload['json']

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


class Checkpoints:
  """`<workdir>/checkpoints`: save every K steps / at the end / on SIGTERM, keep N, restore the latest."""

  def __init__(self, directory: str, *, keep: int, async_save: bool):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'data'),
        item_handlers={'state': ocp.StandardCheckpointHandler(), 'data': DataStateHandler()})

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=DataStateSave(data_state)), force=True)

  def restore(self, step: int, abstract_state):
    """abstract_state: ShapeDtypeStructs with shardings. Returns (state, data_state)."""
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=DataStateRestore()))
    return out['state'], out['data']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionFlag:
  """Set by SIGTERM (a scheduler's preemption notice): the loop checkpoints and exits at the next step boundary."""

  def __init__(self):
    self._event = threading.Event()
    self.signum: Optional[int] = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM,):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signum = signum
    self._event.set()

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def set(self) -> None:
    self._event.set()

  @property
  def is_set(self) -> bool:
    return self._event.is_set()
