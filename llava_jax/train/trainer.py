"""One training stage, top to bottom: mesh, data, model init, restore, compiled step, loop, export.

    summary = train(config, workdir)        # config: a validated stage config (configs/common.py)

Work directory: `checkpoints/` (resumable, see resume.py), `metrics.jsonl`, `tensorboard/`, `config.json`,
and at the end `model/` (the exported model: params in `model.param_dtype`, tokenizer, template). Rerunning
with the same work directory resumes from the latest checkpoint, bit-exactly on CPU.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import jax
import numpy as np

from llava_jax import distributed, model_dir, sharding
from llava_jax.data.pipeline import make_pipeline
from llava_jax.data.tokenize import ImageTokens, check_template_tokens
from llava_jax.models import lora as lora_lib
from llava_jax.models.llava import abstract_params
from llava_jax.train import config_checks, flops, metrics, partition, resume
from llava_jax.train import init as init_lib
from llava_jax.train import setup as setup_lib


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient (nan_policy='stop', or too many skipped steps in a row)."""


def load_tokenizer(path: str, model_config):
  """`data.tokenizer` (HF tokenizer dir or exported model dir), `<image>` added when missing, checked against the
  model."""
  tokenizer = model_dir.load_tokenizer(path)
  if tokenizer is None:
    raise config_checks.ConfigError(f'data.tokenizer={path}: no tokenizer there (a HF tokenizer dir, or an '
                                    'exported model dir with tokenizer/)')
  try:
    model_dir.check_tokenizer(tokenizer, model_config, f'data.tokenizer={path}', missing_image_token='add')
  except model_dir.TokenizerMismatch as e:
    raise config_checks.ConfigError(f'{e}; see model.image_token_id and model.text.vocab_size') from None
  return tokenizer


def _write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(indent=2))


def _preemption_requested(flag: resume.PreemptionFlag) -> bool:
  """Every process must stop at the same step: agree on the flag across processes."""
  if jax.process_count() == 1:
    return flag.is_set
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag.is_set))))


def _export(config, model_config, setup, state, frozen, tokenizer, workdir: str, log) -> Optional[str]:
  if not config.export.model and not config.export.hf_dir and not config.export.peft_dir:
    return None
  dtype = np.dtype(model_config.param_dtype)
  full = partition.merge(state.params, frozen)
  merged = lora_lib.merge(full, setup.lora.scale) if setup.lora is not None else full  # W + (alpha / r) A B
  params = jax.tree.map(lambda x: x.astype(dtype), merged)
  out = os.path.join(workdir, 'model')
  if config.export.model:
    model_dir.save_model(out, model_config, params, tokenizer=tokenizer, template=config.data.template,
                          image_aspect=config.data.image_aspect)
    log(f'exported model ({model_config.param_dtype}) to {out}')
  from jax.experimental import multihost_utils
  gather = lambda tree: multihost_utils.process_allgather(tree, tiled=True) if jax.process_count() > 1 else tree
  if config.export.hf_dir:
    from llava_jax.convert import export_hf_llava
    host = gather(params)
    if jax.process_index() == 0:
      export_hf_llava(config.export.hf_dir, model_config, host, tokenizer, log=log)
      log(f'exported HF LLaVA to {config.export.hf_dir}' + (' (LoRA merged)' if setup.lora else ''))
  if config.export.peft_dir:
    from llava_jax.convert import peft as peft_io
    host = gather(state.params)  # the factors and the projector: what trained
    if jax.process_index() == 0:
      peft_io.write_adapter(config.export.peft_dir, model_config, host, setup.lora, log=log)
  return out if config.export.model else None


def train(config, workdir: str, *, stop_after: Optional[int] = None,
          log: Callable[[str], None] = metrics.log) -> dict:
  """Run (or resume) one stage. `stop_after`: leave after this many steps of this call as if preempted
  (checkpoint, no export); used by tests. Returns {'status', 'step', 'total_steps', 'losses', 'model_dir'}."""
  workdir = os.path.abspath(workdir)
  model_config = config_checks.model_config(config)
  _write_config(config, workdir)

  # --- mesh ------------------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh.shape)
  log(f'mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, '
      f'{jax.process_count()} process(es)')

  # --- data: this process's rows of every global batch ---------------------------------------------------
  tokenizer = load_tokenizer(config.data.tokenizer, model_config)
  d = config.data
  try:
    check_template_tokens(tokenizer, d.template, f'data.tokenizer={d.tokenizer}', key='data.template')
  except ValueError as e:
    raise config_checks.ConfigError(str(e)) from None
  fixed_steps = config.train.steps > 0  # explicit step count: the data repeats as long as needed
  # Processes holding the same rows (e.g. tensor parallelism across hosts) read the same shard.
  shard, num_shards = distributed.data_shard(mesh, d.global_batch_size)
  data = make_pipeline(d.train_dir, split=d.split, tokenizer=tokenizer, template=d.template,
                       num_image_tokens=ImageTokens.of(model_config), image_size=model_config.vision.image_size,
                       image_aspect=d.image_aspect, max_length=d.max_length, global_batch_size=d.global_batch_size,
                       seed=config.seed, num_epochs=None if fixed_steps else d.num_epochs, shuffle=d.shuffle,
                       group_by_length=d.group_by_length, packing=d.packing, row_length=d.row_length,
                       max_images_per_row=d.max_images_per_row, worker_count=d.worker_count,
                       process_index=shard, process_count=num_shards)
  total_steps = config.train.steps if fixed_steps else data.num_steps
  if jax.process_count() > 1:
    distributed.log(f'reads rows {shard * data.batch_size}..{(shard + 1) * data.batch_size - 1} of every global '
                    f'batch of {d.global_batch_size} (data shard {shard} of {num_shards})')
  log(f'data: {data.num_records} records in {d.train_dir}:{d.split}, {data.steps_per_epoch} steps/epoch, '
      f'{total_steps} steps' + (f'; packed: {data.samples_per_epoch} samples in rows of {config_checks.seq_len(config)} tokens, '
                                f'{d.global_batch_size} rows per step' if d.packing else ''))

  # --- restore point -----------------------------------------------------------------------------------------
  ckpts = resume.Checkpoints(os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save)
  latest = ckpts.latest_step()
  finished = latest is not None and latest >= total_steps
  export_dir = os.path.join(workdir, 'model')
  if finished and (model_dir.is_model_dir(export_dir) or not config.export.model) and not config.export.hf_dir \
      and not config.export.peft_dir:
    ckpts.close()
    getattr(data, 'close', lambda: None)()
    log(f'{workdir}: already trained ({latest} steps) and exported; nothing to do')
    return {'status': 'completed', 'step': latest, 'total_steps': total_steps, 'losses': [],
            'model_dir': export_dir if config.export.model else None}

  # --- model, optimizer and the compiled step -----------------------------------------------------------
  t0 = time.perf_counter()
  packing = d.packing  # packed rows: segment_ids, positions and image slots (data/pipeline.py)
  lora = config_checks.lora_spec(config)
  setup = setup_lib.create(model_config, config.train.trainable, config.optim, total_steps, mesh,
                           global_batch=d.global_batch_size, seq_len=config_checks.seq_len(config),
                           grad_accum_steps=config.train.grad_accum_steps, compile=not finished,
                           packed=packing, image_slots=d.max_images_per_row if packing else None,
                           lora=lora, base_bits=config.train.lora.base_bits, seed=config.seed)
  if not finished:
    log(f'compiled train step in {time.perf_counter() - t0:.1f}s; {setup.memory}')

  # --- params: random + checkpoints (frozen ones are always rebuilt this way; trainable ones maybe restored)
  trainable, frozen = init_lib.initial_params(
      config.init, model_config, setup.mask, setup.abstract_state.params, setup_lib.plain_frozen(setup),
      config.seed, log=log, lora=lora, quantize=lambda path, x: setup_lib.quantize_leaf(setup, path, x)
      if path in setup.quantized else x)
  if latest is None:
    state = setup_lib.new_state(setup, trainable)
  else:
    del trainable
    state, data_state = ckpts.restore(latest, setup.abstract_state)
    if not finished:  # a finished stage reads no more data
      data.set_state(data_state)
    log(f'resumed from {ckpts.directory}/{latest}')
  log(partition.param_table(state.params, frozen, partition.tree_bytes(state.opt_state)))

  # --- loop -----------------------------------------------------------------------------------------------
  step = int(state.step)
  units = flops.unit_flops(model_config, setup.mask, abstract_params(model_config))
  step_flops = flops.step_flops(model_config, setup.mask, abstract_params(model_config),
                                d.global_batch_size, config_checks.seq_len(config), d.global_batch_size)
  if config.log.peak_tflops:
    peak, peak_src = config.log.peak_tflops * 1e12, 'config log.peak_tflops'
  else:
    peak, peak_src = flops.peak_flops_per_device(model_config.dtype)
  log(f'{step_flops / 1e12:.4g} TFLOP per step of full rows (flops.py; MFU counts real tokens only); '
      f'peak {peak / 1e12:.4g} TFLOP/s per device ({peak_src})')
  writer = metrics.MetricsWriter(workdir, config.log.tensorboard)
  progress = metrics.Progress(os.path.basename(workdir), total_steps, start=step, every=config.log.every_steps)
  losses, skipped_in_row, status = [], 0, 'completed'
  last_saved = latest
  throughput = metrics.Throughput(units, d.global_batch_size * config_checks.seq_len(config), peak * jax.device_count())
  try:
    with resume.PreemptionFlag() as preempt:
      while step < total_steps:
        try:
          local = next(data)
        except StopIteration:
          raise RuntimeError(f'data ran out at step {step} of {total_steps}') from None
        batch = setup_lib.make_global_batch(setup, local)
        state, m = setup.step(state, frozen, batch)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        step += 1
        throughput.add(m)
        losses.append(m['loss'])
        record = {'loss': m['loss'], 'grad_norm': m['grad_norm'], 'lr': m['lr'], 'supervised_tokens': m['tokens'],
                  'skipped': 1.0 - m['finite']}
        if step % config.log.every_steps == 0 or step == total_steps:
          record.update(throughput.rates())  # real tokens only: tokens/s, samples/s, pad fraction, MFU
        writer.write(step, record)
        progress.update(step, record)
        if not m['finite']:
          skipped_in_row += 1
          if config.train.nan_policy == 'stop' or skipped_in_row > config.train.max_skipped_steps:
            ckpts.wait()
            where = (f'last good checkpoint: step {ckpts.latest_step()} in {ckpts.directory}'
                     if ckpts.latest_step() is not None else 'no checkpoint written yet')
            raise TrainingDiverged(f'non-finite loss or gradient at step {step} (loss={m["loss"]}, grad_norm='
                                   f'{m["grad_norm"]}); the update was not applied; {where}')
          log(f'step {step}: non-finite loss/gradient, update skipped ({skipped_in_row} in a row)')
        else:
          skipped_in_row = 0
        stop_now = _preemption_requested(preempt) or (stop_after is not None and len(losses) >= stop_after)
        if step % config.checkpoint.every_steps == 0 or step == total_steps or stop_now:
          ckpts.save(step, state, data.get_state())
          last_saved = step
        if stop_now:
          status = 'preempted'
          log(f'stopping at step {step} (checkpoint saved in {ckpts.directory}); rerun to resume')
          break
    if last_saved != step and status == 'completed':
      ckpts.save(step, state, data.get_state())
    ckpts.wait()
  finally:
    progress.close()
    writer.close()
    ckpts.close()
    getattr(data, 'close', lambda: None)()

  exported = None
  if status == 'completed':
    stats = data.stats() if hasattr(data, 'stats') else {}
    if stats:
      log(f'data: {stats.get("rows", 0)} rows read this run ({stats.get("samples_per_row", 0.0):.2f} samples per '
          f'row), {stats.get("truncated", 0)} truncated, {stats.get("dropped", 0)} dropped (did not fit max_length), '
          f'pad fraction {stats.get("pad_fraction", 0.0):.2f}, unused image slots '
          f'{stats.get("image_pad_fraction", 0.0):.2f}')
    exported = _export(config, model_config, setup, state, frozen, tokenizer, workdir, log)
  return {'status': status, 'step': step, 'total_steps': total_steps, 'losses': losses, 'model_dir': exported}
