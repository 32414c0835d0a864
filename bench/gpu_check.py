"""GPU check of training, in one run of under 8 minutes on one H100/H200: bf16 against fp32, that the cuDNN
attention kernel is the one compiled in, and the MFU of a stage-2 step of a 1-3B LLaVA at seq 2048, packed and
unpacked.

    python bench/gpu_check.py                 # on the GPU: Qwen2-1.5B + CLIP ViT-L/14-336 (1.9B), 4 rows x 2048
    python bench/gpu_check.py --llm vicuna_7b_v1_5 --rows 2 --remat full   # a larger one
    python bench/gpu_check.py --smoke         # tiny model, CPU, seconds (tests/test_gpu_check.py)

1. parity: one packed row through a short model of the same widths (2 LLM layers, 2 vision layers) in fp32 (XLA
   attention) and in bf16 (the kernel `attention` picks: cuDNN on GPU): logits error max|bf16 - fp32| / max|fp32|
   <= 2e-2 (as tests/test_models.py) and the loss within 1e-2 relative.
2. kernel: `__cudnn$fmha*` custom calls (forward and backward) in the compiled bf16 train steps of 3. On GPU they
   must be there; elsewhere `select_attention_kernel` says 'xla' and there must be none.
3. MFU: the stage-2 step (projector + LLM train, vision tower frozen), bf16, compiled ahead of time
   (train/setup.py), on rows of --seq tokens from one length distribution (below): unpacked (one sample per row,
   padded) and packed (first-fit, data.pipeline.pack_rows, --slots image slots per row). tokens/s, samples/s and
   MFU count real work only (train.step.batch_work, flops.work_flops); the peak is the device's bf16 spec sheet
   figure (flops.peak_flops_per_device; measured on a CPU).

Lengths: LLaVA-1.5's mix665k is ~94% image samples (576 image tokens + a conversation) and ~6% text-only ShareGPT
turns. Text tokens here: lognormal, median 150 (sigma 0.9) for image samples and 600 (sigma 0.8) for text-only
ones, cut to fit the row: an illustration of that mix, not a measurement of it (bench/epoch.py has the measured
one). Exit status 0 when every check passes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from llava_jax import sharding  # noqa: E402
from llava_jax.data.pipeline import pack_rows  # noqa: E402
from llava_jax.models import presets  # noqa: E402
from llava_jax.models.config import LlavaConfig  # noqa: E402
from llava_jax.models.layers import select_attention_kernel  # noqa: E402
from llava_jax.models.llava import Llava, abstract_params, init_params  # noqa: E402
from llava_jax.train import flops, setup as setup_lib  # noqa: E402
from llava_jax.train.step import batch_work, next_token_loss  # noqa: E402

CUDNN_CALL = '__cudnn$fmha'  # custom-call target prefix of jax's cuDNN attention (jax/_src/cudnn)
LOGITS_TOL, LOSS_TOL = 2e-2, 1e-2


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--smoke', action='store_true', help='tiny model and rows (CPU): the same code paths in seconds')
  p.add_argument('--llm', default='qwen2_1_5b', choices=sorted(presets.TEXT), help='decoder preset')
  p.add_argument('--vision', default='clip_vit_l14_336', choices=sorted(presets.VISION), help='vision preset')
  p.add_argument('--rows', type=int, default=4, help='rows per step (the global batch)')
  p.add_argument('--seq', type=int, default=2048, help='tokens per row')
  p.add_argument('--slots', type=int, default=3, help='image slots per packed row')
  p.add_argument('--remat', default='none', choices=('none', 'full', 'dots', 'dots_no_batch'))
  p.add_argument('--steps', type=int, default=10, help='timed steps per layout')
  p.add_argument('--seed', type=int, default=0)
  a = p.parse_args(argv)
  if a.smoke:
    a.llm, a.vision, a.rows, a.seq, a.slots, a.steps = 'tiny', 'tiny', 2, 128, 6, 2
  return a


def model_config(a, dtype: str, llm_layers=None, vision_layers=None) -> LlavaConfig:
  text, vision = presets.TEXT[a.llm], presets.VISION[a.vision]
  if llm_layers:
    text = dataclasses.replace(text, num_layers=llm_layers)
  if vision_layers:
    vision = dataclasses.replace(vision, num_layers=vision_layers + 1)  # feature layer -2: one block unused
  return LlavaConfig(vision=vision, text=text, projector='mlp2x_gelu', image_token_id=text.vocab_size - 1,
                     dtype=dtype, param_dtype='float32', remat_policy=a.remat)


# ------------------------------------------------------------------------------------------------------ data


def sample_lengths(rng, n: int, image_tokens: int, seq: int, image_share: float = 0.94):
  """(total tokens int [n], has_image bool [n]) of the illustrative mix in the module docstring (text lengths
  scaled by seq / 2048 for other row lengths)."""
  has_image = rng.random(n) < image_share
  scale = seq / 2048
  text = scale * np.where(has_image, rng.lognormal(np.log(150), 0.9, n), rng.lognormal(np.log(600), 0.8, n))
  total = 1 + np.where(has_image, image_tokens, 0) + np.maximum(text.astype(np.int64), 4)
  return np.minimum(total, seq), has_image


def sample(rng, length: int, has_image: bool, config: LlavaConfig):
  """ids: BOS, the image tokens, text; labels: the second half of the text."""
  n = config.num_image_tokens if has_image else 0
  ids = rng.integers(2, config.image_token_id, length).astype(np.int32)
  ids[0] = 1
  ids[1:1 + n] = config.image_token_id
  labels = np.full(length, -100, np.int32)
  start = 1 + n + (length - 1 - n) // 2
  labels[start:] = ids[start:]
  return ids, labels


def unpacked_batch(rng, config, rows: int, seq: int):
  size = config.vision.image_size
  lengths, has_image = sample_lengths(rng, rows, config.num_image_tokens, seq)
  b = {'input_ids': np.zeros((rows, seq), np.int32), 'labels': np.full((rows, seq), -100, np.int32),
       'attention_mask': np.zeros((rows, seq), np.int32),
       'pixel_values': rng.standard_normal((rows, size, size, 3), dtype=np.float32)}
  for r in range(rows):
    ids, labels = sample(rng, int(lengths[r]), bool(has_image[r]), config)
    b['input_ids'][r, :len(ids)], b['labels'][r, :len(ids)], b['attention_mask'][r, :len(ids)] = ids, labels, 1
  return b


def packed_batch(rng, config, rows: int, seq: int, slots: int):
  """`rows` full rows of first-fit packing (the pipeline's planner) over samples of the same mix."""
  size = config.vision.image_size
  # Enough samples that the first `rows` rows are closed ones (first-fit keeps 64 rows open).
  lengths, has_image = sample_lengths(rng, 4 * (64 + rows) * max(1, seq // 200), config.num_image_tokens, seq)
  ids_of, starts = pack_rows(np.arange(len(lengths)), lengths, has_image.astype(np.int64), row_length=seq,
                             max_images=slots, num_bins=64)
  b = {k: np.zeros((rows, seq), np.int32) for k in ('input_ids', 'segment_ids', 'positions')}
  b['labels'] = np.full((rows, seq), -100, np.int32)
  b['pixel_values'] = np.zeros((rows, slots, size, size, 3), np.float32)
  b['image_valid'] = np.zeros((rows, slots), bool)
  for r in range(rows):  # the first rows were closed full by first-fit
    at, slot = 0, 0
    for seg, i in enumerate(ids_of[starts[r]:starts[r + 1]], start=1):
      ids, labels = sample(rng, int(lengths[i]), bool(has_image[i]), config)
      span = slice(at, at + len(ids))
      b['input_ids'][r, span], b['labels'][r, span] = ids, labels
      b['segment_ids'][r, span], b['positions'][r, span] = seg, np.arange(len(ids))
      if has_image[i]:
        b['pixel_values'][r, slot] = rng.standard_normal((size, size, 3), dtype=np.float32)
        b['image_valid'][r, slot] = True
        slot += 1
      at += len(ids)
  b['attention_mask'] = (b['segment_ids'] > 0).astype(np.int32)
  return b


# ---------------------------------------------------------------------------------------------------- checks


def check_parity(a, rng, params=None) -> dict:
  """bf16 vs fp32 logits and loss of a short model of the same widths on one packed row (--smoke: the tiny
  model itself, `params`)."""
  fp32 = model_config(a, 'float32') if a.smoke else model_config(a, 'float32', llm_layers=2, vision_layers=2)
  if params is None:
    params = init_params(fp32, jax.random.key(a.seed))
  batch = packed_batch(rng, fp32, 1, a.seq, a.slots)
  keys = ('segment_ids', 'positions', 'image_valid')

  def forward(config):
    model = Llava(config)
    fn = jax.jit(lambda p, b: model.apply({'params': p}, b['input_ids'], b['pixel_values'], b['attention_mask'],
                                          **{k: b[k] for k in keys}))
    compiled = fn.lower(params, batch).compile()
    logits = compiled(params, batch)
    loss, count = next_token_loss(logits, batch['labels'], batch['segment_ids'])
    return np.asarray(logits, np.float32), float(loss / count), compiled.as_text()

  ref, ref_loss, _ = forward(fp32)
  out, loss, hlo = forward(fp32.replace(dtype='bfloat16'))
  err = float(np.abs(out - ref).max() / np.abs(ref).max())
  loss_err = abs(loss - ref_loss) / abs(ref_loss)
  return {'logits_rel_err': err, 'loss_fp32': ref_loss, 'loss_bf16': loss, 'loss_rel_err': loss_err,
          'cudnn_calls_forward': len(cudnn_calls(hlo)),
          'ok': err <= LOGITS_TOL and loss_err <= LOSS_TOL}


def cudnn_calls(hlo: str) -> list[str]:
  """Targets of the cuDNN fused-attention custom calls in a compiled module's HLO text."""
  return re.findall(r'__cudnn\$fmha\w*', hlo)


def measure_step(a, config, params, batch, packed: bool, peak: tuple[float, str]) -> dict:
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  t = time.perf_counter()
  setup = setup_lib.create(config, common.STAGE2_TRAINABLE, common.stage_config().optim, 10 ** 6, mesh,
                           global_batch=a.rows, seq_len=a.seq, packed=packed,
                           image_slots=a.slots if packed else None)
  compile_s = time.perf_counter() - t
  hlo = setup.step.as_text()
  state, frozen = setup_lib.init_state(setup, params)
  placed = setup_lib.make_global_batch(setup, batch)
  for _ in range(2):  # warm-up
    state, m = setup.step(state, frozen, placed)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(a.steps):
    state, m = setup.step(state, frozen, placed)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t) / a.steps
  work = {k: float(v) for k, v in batch_work(batch, config.image_token_id).items()}
  units = flops.unit_flops(config, setup.mask, abstract_params(config))
  (peak, peak_src), model_flops = peak, flops.work_flops(units, work['real_tokens'], work['attention_pairs'],
                                                         work['images'])
  return {'compile_s': compile_s, 'step_ms': dt * 1e3, 'tokens_per_s': work['real_tokens'] / dt,
          'samples_per_s': work['samples'] / dt, 'pad_fraction': 1 - work['real_tokens'] / (a.rows * a.seq),
          'samples_per_row': work['samples'] / a.rows, 'mfu': model_flops / dt / peak, 'peak_src': peak_src,
          'loss': float(m['loss']), 'cudnn_calls': len(cudnn_calls(hlo)),
          'cudnn_backward': any(c.endswith('Backward') for c in cudnn_calls(hlo)), 'memory': setup.memory}


def kernel_verdict(expected: str, calls: dict[str, int]) -> bool:
  """cuDNN expected: every compiled step has its custom calls; otherwise none has any."""
  return all(c > 0 for c in calls.values()) if expected == 'cudnn' else not any(calls.values())


def run(a) -> dict:
  t0 = time.perf_counter()
  rng = np.random.default_rng(a.seed)
  backend = jax.default_backend()
  expected = select_attention_kernel(backend, jnp.bfloat16, a.seq, a.seq, has_mask=True)
  print(f'device {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}; bf16 attention kernel '
        f'expected: {expected}', flush=True)

  config = model_config(a, 'bfloat16')
  # On the host: each layout places (and its step donates) its own copy.
  params = jax.device_get(init_params(config, jax.random.key(a.seed)))
  parity = check_parity(a, rng, params if a.smoke else None)
  where = 'the model' if a.smoke else '2 LLM + 2 vision layers'
  print(f'[1] bf16 vs fp32 (one packed row of {a.seq}, {where}): logits rel err {parity["logits_rel_err"]:.2e} '
        f'(<= {LOGITS_TOL}), loss {parity["loss_bf16"]:.5f} vs {parity["loss_fp32"]:.5f} (rel '
        f'{parity["loss_rel_err"]:.1e}, <= {LOSS_TOL}): {"ok" if parity["ok"] else "FAIL"}  '
        f'[{time.perf_counter() - t0:.0f} s]', flush=True)

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))
  print(f'model: {a.llm} + {a.vision}, {n_params / 1e9:.2f}B params, {config.num_image_tokens} image tokens; '
        f'stage 2, bf16, remat {a.remat}; {a.rows} rows x {a.seq}', flush=True)
  # A CPU has no spec-sheet peak: it is measured (small in --smoke, where MFU only shows the arithmetic runs).
  peak = ((flops.measure_matmul_peak('float32', n=256), 'cpu: measured float32 256^2 matmul') if a.smoke
          else flops.peak_flops_per_device(config.dtype))
  steps = {}
  for name, packed in (('unpacked', False), ('packed', True)):
    batch = packed_batch(rng, config, a.rows, a.seq, a.slots) if packed else unpacked_batch(rng, config, a.rows,
                                                                                            a.seq)
    steps[name] = measure_step(a, config, params, batch, packed, peak)
    print(f'    {name}: compiled in {steps[name]["compile_s"]:.0f} s; {steps[name]["memory"]}  '
          f'[{time.perf_counter() - t0:.0f} s]', flush=True)

  calls = {k: v['cudnn_calls'] for k, v in steps.items()}
  kernel_ok = kernel_verdict(expected, calls)
  backward = all(v['cudnn_backward'] for v in steps.values())
  print(f'[2] attention kernel: {CUDNN_CALL}* custom calls in the compiled steps: {calls} (backward ones: '
        f'{backward}); expected {expected}: {"ok" if kernel_ok else "FAIL"}')

  print(f'[3] stage-2 step, MFU of real work (peak: {steps["packed"]["peak_src"]})')
  print(f'    {"layout":9} {"step ms":>8} {"tokens/s":>10} {"samples/s":>9} {"samples/row":>11} {"pad":>5} '
        f'{"MFU":>6} {"loss":>7}')
  for name, s in steps.items():
    print(f'    {name:9} {s["step_ms"]:8.1f} {s["tokens_per_s"]:10,.0f} {s["samples_per_s"]:9.1f} '
          f'{s["samples_per_row"]:11.2f} {s["pad_fraction"]:5.0%} {s["mfu"]:6.1%} {s["loss"]:7.3f}')
  ratio = steps['packed']['tokens_per_s'] / steps['unpacked']['tokens_per_s']
  print(f'    packed / unpacked real tokens/s: {ratio:.2f}x; total {time.perf_counter() - t0:.0f} s')
  return {'backend': backend, 'expected_kernel': expected, 'parity': parity, 'kernel_ok': kernel_ok,
          'cudnn_calls': calls, 'steps': steps, 'packed_over_unpacked': ratio,
          'ok': parity['ok'] and kernel_ok, 'seconds': time.perf_counter() - t0}


def main(argv=None) -> int:
  result = run(parse_args(argv))
  print('all checks passed' if result['ok'] else 'CHECKS FAILED')
  return 0 if result['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
