"""Multi-process start-up: `jax.distributed.initialize` from flags, env or the cluster's own variables.

Order: explicit values (flags or LLAVA_COORDINATOR / LLAVA_NUM_PROCESSES / LLAVA_PROCESS_ID / LLAVA_LOCAL_DEVICE_IDS)
> auto-detection (SLURM with more than one task, TPU pod VMs, Open MPI) > a plain single-process run that needs none.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import jax


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
  return int(v) if v not in (None, '') else None


def from_env(args: Optional[DistributedArgs] = None) -> DistributedArgs:
  a = dataclasses.replace(args) if args else DistributedArgs()
  a.coordinator = a.coordinator or os.environ.get('LLAVA_COORDINATOR') or None
  a.num_processes = a.num_processes if a.num_processes is not None else _env_int('LLAVA_NUM_PROCESSES')
  a.process_id = a.process_id if a.process_id is not None else _env_int('LLAVA_PROCESS_ID')
  if a.local_device_ids is None and os.environ.get('LLAVA_LOCAL_DEVICE_IDS'):
    a.local_device_ids = [int(x) for x in os.environ['LLAVA_LOCAL_DEVICE_IDS'].split(',')]
  return a


def detected_cluster() -> Optional[str]:
  """Name of a multi-process environment jax can auto-detect, or None for a single process."""
  if _env_int('SLURM_NTASKS') and _env_int('SLURM_NTASKS') > 1 and os.environ.get('SLURM_JOB_ID'):
    return 'slurm'
  if _env_int('OMPI_COMM_WORLD_SIZE') and _env_int('OMPI_COMM_WORLD_SIZE') > 1:
    return 'openmpi'
  if os.environ.get('TPU_WORKER_HOSTNAMES') and ',' in os.environ['TPU_WORKER_HOSTNAMES']:
    return 'tpu'
  return None


def initialize(args: Optional[DistributedArgs] = None) -> bool:
  """Start jax.distributed when this is a multi-process run. Returns True if it did.

  Must run before anything touches jax devices.
  """
  a = from_env(args)
  explicit = a.coordinator is not None or (a.num_processes or 0) > 1
  cluster = detected_cluster()
  if not explicit and cluster is None:
    return False
  if explicit:
    missing = [n for n, v in (('coordinator', a.coordinator), ('num_processes', a.num_processes),
                              ('process_id', a.process_id)) if v is None]
    if missing:
      raise ValueError(f'multi-process run needs {missing} too (flags --coordinator/--num_processes/--process_id '
                       'or env LLAVA_COORDINATOR/LLAVA_NUM_PROCESSES/LLAVA_PROCESS_ID)')
  # Only used between CPU devices of different processes (tests, local_multiprocess.sh); harmless on GPU/TPU.
  jax.config.update('jax_cpu_collectives_implementation', a.cpu_collectives)
  jax.distributed.initialize(
      coordinator_address=a.coordinator, num_processes=a.num_processes, process_id=a.process_id,
      local_device_ids=a.local_device_ids, initialization_timeout=a.init_timeout,
      heartbeat_timeout_seconds=a.heartbeat_timeout, shutdown_timeout_seconds=a.shutdown_timeout)
  print(f'[process {jax.process_index()}/{jax.process_count()}] jax.distributed up '
        f'({"explicit" if explicit else cluster}); {jax.local_device_count()} local / {jax.device_count()} global '
        'devices', flush=True)
  return True
