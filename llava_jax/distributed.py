"""Multi-process start-up: `jax.distributed.initialize` from flags, env or the cluster's own variables.

Order: explicit values (flags --coordinator/--num_processes/--process_id/--local_device_ids, or env
LLAVA_COORDINATOR / LLAVA_NUM_PROCESSES / LLAVA_PROCESS_ID / LLAVA_LOCAL_DEVICE_IDS) > auto-detection (SLURM with
more than one task, Open MPI's mpirun, TPU pod workers, or LLAVA_CLUSTER=auto: let jax find the cluster) > a plain
single-process run that needs none of it. LLAVA_CLUSTER=none turns auto-detection off.

Failure behaviour: every process sends heartbeats to the coordinator (process 0). When a process dies (or its host
stops answering) for `heartbeat_timeout` seconds, jax's coordination service aborts every other process (SIGABRT,
exit status 134, 'the JAX distributed service detected fatal errors ... another task died' on stderr) instead of
leaving them blocked in a collective; if the coordinator itself dies the others abort at once, and a process that
stops on a Python error takes the others down within `shutdown_timeout`. Rerunning the same command resumes from
the last complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import jax
from absl import flags

from llava_jax import sharding


@dataclasses.dataclass
class DistributedArgs:
  coordinator: Optional[str] = None      # host:port of process 0
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[Sequence[int]] = None
  # A dead peer is noticed after heartbeat_timeout; the survivors then exit with an error instead of hanging.
  heartbeat_timeout: int = 30
  init_timeout: int = 300
  shutdown_timeout: int = 30
  cpu_collectives: str = 'gloo'          # collectives between CPU devices of different processes


def _env_int(name: str) -> Optional[int]:
  v = os.environ.get(name)
  if v in (None, ''):
    return None
  try:
    return int(v)
  except ValueError:
    raise ValueError(f'environment variable {name}={v!r} is not an integer') from None


def _device_ids(text: str, where: str) -> list[int]:
  try:
    return [int(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise ValueError(f'{where}={text!r}: expected comma-separated device ids, e.g. 0,1,2,3') from None


def define_flags(fv: flags.FlagValues) -> None:
  """--coordinator / --num_processes / --process_id / --local_device_ids (each also settable by env)."""
  help_ = ' (multi-process; not needed on SLURM, Open MPI, TPU pods or a single machine)'
  flags.DEFINE_string('coordinator', None, 'HOST:PORT of process 0 (env LLAVA_COORDINATOR)' + help_, flag_values=fv)
  flags.DEFINE_integer('num_processes', None, 'number of processes (env LLAVA_NUM_PROCESSES)', flag_values=fv)
  flags.DEFINE_integer('process_id', None, 'this process, 0..num_processes-1 (env LLAVA_PROCESS_ID)',
                       flag_values=fv)
  flags.DEFINE_string('local_device_ids', None, 'devices this process drives, e.g. 0,1 (env LLAVA_LOCAL_DEVICE_IDS)',
                      flag_values=fv)


def from_flags(fv: flags.FlagValues) -> DistributedArgs:
  ids = fv['local_device_ids'].value
  return DistributedArgs(coordinator=fv['coordinator'].value, num_processes=fv['num_processes'].value,
                         process_id=fv['process_id'].value,
                         local_device_ids=_device_ids(ids, '--local_device_ids') if ids else None)


def from_env(args: Optional[DistributedArgs] = None) -> DistributedArgs:
  """Fill what `args` leaves unset from LLAVA_* environment variables."""
  a = dataclasses.replace(args) if args else DistributedArgs()
  a.coordinator = a.coordinator or os.environ.get('LLAVA_COORDINATOR') or None
  a.num_processes = a.num_processes if a.num_processes is not None else _env_int('LLAVA_NUM_PROCESSES')
  a.process_id = a.process_id if a.process_id is not None else _env_int('LLAVA_PROCESS_ID')
  if a.local_device_ids is None and os.environ.get('LLAVA_LOCAL_DEVICE_IDS'):
    a.local_device_ids = _device_ids(os.environ['LLAVA_LOCAL_DEVICE_IDS'], 'LLAVA_LOCAL_DEVICE_IDS')
  return a


def detected_cluster() -> Optional[str]:
  """Name of a multi-process environment jax can auto-detect, or None for a single process."""
  forced = os.environ.get('LLAVA_CLUSTER', '').lower()
  if forced in ('none', 'off'):
    return None
  if forced:
    return forced  # e.g. 'auto' from launch/tpu_pod.sh: jax reads the TPU VM metadata itself
  if (_env_int('SLURM_NTASKS') or 0) > 1 and os.environ.get('SLURM_JOB_ID'):
    return 'slurm'
  if (_env_int('OMPI_COMM_WORLD_SIZE') or 0) > 1:
    return 'openmpi'
  if ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '') or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu'
  return None


def initialize(args: Optional[DistributedArgs] = None) -> bool:
  """Start jax.distributed when this is a multi-process run. Returns True if it did.

  Must run before anything touches jax devices.
  """
  a = from_env(args)
  explicit = a.coordinator is not None or (a.num_processes or 0) > 1
  cluster = None if explicit else detected_cluster()
  if not explicit and cluster is None:
    return False
  if explicit:
    missing = [n for n, v in (('coordinator', a.coordinator), ('num_processes', a.num_processes),
                              ('process_id', a.process_id)) if v is None]
    if missing:
      raise ValueError(f'multi-process run needs {missing} too (flags --coordinator/--num_processes/--process_id '
                       'or env LLAVA_COORDINATOR/LLAVA_NUM_PROCESSES/LLAVA_PROCESS_ID)')
    if not 0 <= a.process_id < a.num_processes:
      raise ValueError(f'process_id={a.process_id} outside [0, num_processes={a.num_processes})')
  # Only used between CPU devices of different processes (tests, local_multiprocess.sh); harmless on GPU/TPU.
  jax.config.update('jax_cpu_collectives_implementation', a.cpu_collectives)
  jax.distributed.initialize(
      coordinator_address=a.coordinator, num_processes=a.num_processes, process_id=a.process_id,
      local_device_ids=a.local_device_ids, initialization_timeout=a.init_timeout,
      heartbeat_timeout_seconds=a.heartbeat_timeout, shutdown_timeout_seconds=a.shutdown_timeout)
  log(f'jax.distributed up ({"explicit" if explicit else cluster}, coordinator '
      f'{a.coordinator or "auto-detected"}); {jax.local_device_count()} local / {jax.device_count()} global '
      f'{jax.devices()[0].platform} devices; a peer silent for {a.heartbeat_timeout}s stops every process')
  return True


def log(message: str) -> None:
  """Print on every process, prefixed with its index (the trainer's `metrics.log` prints on process 0 only)."""
  print(f'[process {jax.process_index()}/{jax.process_count()}] {message}', flush=True)


def data_shard(mesh: jax.sharding.Mesh, global_batch: int) -> tuple[int, int]:
  """(index, count): this process feeds block `index` of `count` equal row blocks of every global batch.

  The rows a process feeds are those its devices hold under the batch sharding (leading dim over the mesh's data
  axes). Processes whose devices differ only along non-batch axes (e.g. tensor parallelism across hosts) hold the
  same rows: they get the same block and read the same records, so `count` can be smaller than the process count.
  """
  spec = sharding.batch_sharding(mesh, 1)
  starts, size = set(), None
  for device, index in spec.devices_indices_map((global_batch,)).items():
    if device.process_index == jax.process_index():
      rows = index[0]
      start, stop = rows.start or 0, global_batch if rows.stop is None else rows.stop
      starts.add(start)
      size = stop - start
  if not starts:
    raise ValueError(f'process {jax.process_index()} owns no device of the mesh {dict(mesh.shape)}')
  first, last = min(starts), max(starts)
  if last - first + size != len(starts) * size or global_batch % (len(starts) * size):
    raise ValueError(f'process {jax.process_index()}: its rows of the global batch ({sorted(starts)}, {size} each) '
                     f'are not one contiguous block; order the mesh devices by process')
  block = len(starts) * size
  return first // block, global_batch // block
