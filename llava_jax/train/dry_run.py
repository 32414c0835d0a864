"""Size a training job before it starts: abstract params and optimizer state, the train step lowered and compiled
for the configured mesh, bytes per device, and whether that fits the target's memory. Nothing is allocated.

  python -m llava_jax.train --config configs/scale.py:7b_stage2_8xh100 --dry_run

The mesh has as many devices as the config's `hardware.devices` (else the product of `mesh.shape`, else the
devices of this machine). They are simulated with CPU devices (`jax_num_cpu_devices`), so a laptop can size an
8-GPU or 16-chip job; the compiled figures are XLA's buffer assignment of the same sharded program for the CPU
backend (no fused attention kernels, its own fusion decisions): a guide within some GiB, not a guarantee.
Data paths and `init.*` checkpoints are not read and need not exist.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import jax
import numpy as np

from llava_jax import sharding
from llava_jax.models.config import LlavaConfig
from llava_jax.models.llava import abstract_params
from llava_jax.train import config_checks, flops, partition
from llava_jax.train import setup as setup_lib

GiB = 2**30
# Share of HBM the step may use: the rest goes to the runtime, collective buffers and fragmentation (the SLURM
# launcher sets XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 on GPUs).
USABLE_FRACTION = 0.9
# Keys the dry run never reads (data on disk, checkpoints to load): their validation errors do not apply.
_UNUSED_KEYS = ('data.train_dir', 'data.tokenizer', 'init.')


def target_devices(config):
  """Devices the job runs on: hardware.devices, else a mesh.shape without -1, else None (this machine's own)."""
  hw = config.get('hardware')
  if hw is not None and hw.get('devices'):
    return int(hw.devices)
  shape = tuple(config.mesh.shape)
  return None if -1 in shape else math.prod(shape)


def use_cpu_devices(n: int) -> list:
  """`n` CPU devices: set up before jax starts (this process's first jax use), else taken from those present."""
  try:
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:  # jax already started in this process (e.g. tests): use its CPU devices
    pass
  devices = jax.devices('cpu')
  if len(devices) < n:
    raise config_checks.ConfigError(f'the dry run needs {n} CPU devices but jax already started with {len(devices)}; '
                                 'run it as its own command (python -m llava_jax.train ... --dry_run)')
  return devices[:n]


def check(stage, num_devices: int) -> None:
  """The stage's own validation, minus data and checkpoint paths that the dry run does not read."""
  errors = config_checks.stage_errors(stage, num_devices=num_devices, check_paths=False)
  config_checks.raise_if([e for e in errors if not e.startswith(_UNUSED_KEYS)])


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (largest shard of each leaf)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, 'sharding', None) is not None else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


def activation_bytes(mc: LlavaConfig, micro_batch: int, seq_len: int, tensor: int) -> int:
  """Estimate of one device's activation memory in the LLM's forward + backward, per micro-batch.

  b = micro_batch rows per device, S = seq_len, d / f / q / kv = hidden / MLP / query / key-value widths (the
  last three divided over the tensor axis), c = bytes of the compute dtype. What the backward pass keeps per layer:
    full           b S d c                          (the block input; everything else is recomputed)
    dots_no_batch  b S (2d + q + 2kv + 2f) c        (outputs of the weight matmuls)
    dots           + b S q c + b h S^2 c            (attention scores and their product with V too)
    none           + b h S^2 4 + b S (4d 4 + f c)   (softmax in fp32, norms, the MLP's activation)
  plus the working set of one layer's backward (twice the 'none' figure: activations and their gradients) and
  the logits [b, S, vocab] in c, their fp32 copy and fp32 gradient. The frozen vision tower keeps nothing: no
  gradient flows into it.
  """
  t = mc.text
  c = np.dtype(mc.dtype).itemsize
  b, S, d = micro_batch, seq_len, t.hidden_size
  q, kv = t.num_heads * t.dim_per_head / tensor, t.num_kv_heads * t.dim_per_head / tensor
  f, h = t.intermediate_size / tensor, t.num_heads / tensor
  dots_no_batch = b * S * (2 * d + q + 2 * kv + 2 * f) * c
  dots = dots_no_batch + b * S * q * c + b * h * S * S * c
  none = dots + b * h * S * S * 4 + b * S * (4 * d * 4 + f * c)
  saved = {'full': b * S * d * c, 'dots_no_batch': dots_no_batch, 'dots': dots, 'none': none}[mc.remat_policy]
  logits = b * S * (t.vocab_size / tensor) * (c + 4 + 4)
  return int(t.num_layers * saved + 2 * none + logits)


def _gib(n: float) -> str:
  return f'{n / GiB:8.2f}'


def dry_run(config, *, devices=None, name: str = '', log: Callable[[str], None] = print) -> dict:
  """Compile one stage's train step for its mesh on `devices` and report memory per device. Returns the figures
  (bytes) and `fits` (None when the config names no hardware.hbm_gib)."""
  mc = config_checks.model_config(config)
  devices = list(jax.devices() if devices is None else devices)
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  d = config.data
  accum = config.train.grad_accum_steps
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  micro = d.global_batch_size // shards // accum
  hw = config.get('hardware')
  plural = 's' if len(devices) > 1 else ''
  target = (hw.get('name') if hw is not None else None) or f'{len(devices)} device{plural}'
  log(f'dry run {name}: {target}, compiled for {len(devices)} {devices[0].platform} device{plural}')
  log(f'mesh {dict(mesh.shape)}; global batch {d.global_batch_size} = {shards} x {micro} rows x {accum} '
      f'micro-batch(es), seq {config_checks.seq_len(config)}; remat {mc.remat_policy}; compute {mc.dtype}' +
      (f'; LoRA r {config.train.lora.r}' + (f', base {config.train.lora.base_bits}-bit' if config.train.lora.base_bits
                                            else '') if config.train.lora.r else ''))

  t0 = time.perf_counter()
  total_steps = max(config.train.steps, 1)  # only the schedule's constants depend on it
  lora, bits = config_checks.lora_spec(config), config.train.lora.base_bits
  setup = setup_lib.create(mc, config.train.trainable, config.optim, total_steps, mesh,
                           global_batch=d.global_batch_size, seq_len=config_checks.seq_len(config),
                           grad_accum_steps=accum,
                           packed=d.packing, image_slots=d.max_images_per_row if d.packing else None,
                           lora=lora, base_bits=bits)
  compile_s = time.perf_counter() - t0
  state = setup.abstract_state
  log(partition.param_table(state.params, setup.abstract_frozen, partition.tree_bytes(state.opt_state)))

  figures = {
      'trainable_params': per_device_bytes(state.params),
      'frozen_params': per_device_bytes(setup.abstract_frozen),
      'optimizer_state': per_device_bytes(state.opt_state),
      'gradients': per_device_bytes(state.params),  # fp32, sharded like the params; live during the update
      'batch': per_device_bytes(setup.abstract_batch),
      'activations': activation_bytes(mc, micro, config_checks.seq_len(config), mesh.shape['tensor']),
  }
  figures['total_estimate'] = sum(figures.values())
  m = setup.step.memory_analysis()
  compiled = {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
              'aliased': m.alias_size_in_bytes, 'temporaries': m.temp_size_in_bytes}
  compiled['peak'] = compiled['arguments'] + compiled['outputs'] - compiled['aliased'] + compiled['temporaries']
  labels = {'trainable_params': 'trainable params (fp32 master)', 'frozen_params': f'frozen params ({mc.dtype}' + (f', LoRA\'d kernels {bits}-bit)' if bits else ')'),
            'optimizer_state': 'optimizer state (AdamW moments)', 'gradients': 'gradients (fp32, transient)',
            'batch': 'input batch', 'activations': f'activations (estimate, remat {mc.remat_policy})',
            'total_estimate': 'total (estimate)'}
  lines = [f'{"per device":<44} {"GiB":>8}']
  lines += [f'  {labels[k]:<42} {_gib(v)}' for k, v in figures.items()]
  lines.append(f'compiled train step (XLA memory analysis, compiled in {compile_s:.0f}s)')
  lines += [f'  {k:<42} {_gib(v)}' for k, v in compiled.items() if k != 'peak']
  lines.append(f'  {"peak = arguments + outputs - aliased + temps":<42} {_gib(compiled["peak"])}')
  log('\n'.join(lines))

  result = {'name': name, 'target': target, 'devices': len(devices), 'mesh': dict(mesh.shape),
            'micro_batch': micro, 'remat_policy': mc.remat_policy, 'compile_s': compile_s, **figures,
            **{f'compiled_{k}': v for k, v in compiled.items()}, 'fits': None}
  need = max(compiled['peak'], figures['total_estimate'])
  if hw is not None and hw.get('hbm_gib'):
    budget = USABLE_FRACTION * hw.hbm_gib * GiB
    result['fits'] = bool(need <= budget)
    verdict = 'FITS' if result['fits'] else 'DOES NOT FIT'
    log(f'verdict: {verdict}: needs {need / GiB:.1f} GiB per device (the larger of compiled peak and estimate) of '
        f'{hw.hbm_gib:g} GiB HBM ({100 * need / (hw.hbm_gib * GiB):.0f}%; budget {USABLE_FRACTION:.0%} = '
        f'{budget / GiB:.1f} GiB)')
    if not result['fits']:
      log('  to fit: raise train.grad_accum_steps (smaller micro-batches), a stronger model.remat_policy '
          "('full' saves least), more devices or a tensor axis in mesh.shape")
  else:
    log(f'needs {need / GiB:.1f} GiB per device; set hardware.hbm_gib for a fits / does-not-fit verdict')
  step_flops = flops.step_flops(mc, setup.mask, abstract_params(mc), d.global_batch_size, config_checks.seq_len(config),
                                d.global_batch_size)
  result['step_tflop'] = step_flops / 1e12
  if config.log.peak_tflops:
    seconds = step_flops / (0.4 * config.log.peak_tflops * 1e12 * len(devices))
    log(f'{step_flops / 1e12:,.0f} TFLOP per step: {seconds:.1f}s per step at 40% MFU of '
        f'{config.log.peak_tflops:g} TFLOP/s per device')
  return result


def main(config, name: str = '') -> int:
  """`python -m llava_jax.train --config SPEC --dry_run` on the loaded (not yet validated) stage config.
  Exit status 0: it fits (or no hardware.hbm_gib to judge by), 2: it does not fit, 1: bad config."""
  try:
    n = target_devices(config)
    devices = use_cpu_devices(n) if n else jax.devices()
    check(config, len(devices))
    result = dry_run(config, devices=devices, name=name)
  except config_checks.ConfigError as e:
    print(f'error: {e}')
    return 1
  return 0 if result['fits'] is not False else 2
