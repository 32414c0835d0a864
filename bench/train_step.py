"""Train-step speed: our AOT-compiled step (llava_jax.train.setup) vs transformers' LlavaForConditionalGeneration
(PyTorch, CPU) on the same config, weights, batch, sequence length, dtype, frozen parts and optimizer.

    python bench/train_step.py                              # reference size (below), fp32, stage 2
    python bench/train_step.py --text-layers 8 --seq 512 --stage 1 --dtype bfloat16
    python bench/train_step.py --no-torch --profile /tmp/prof  # ours only, plus a per-op time table
    python bench/train_step.py --lora 16 [--base-bits 4]      # ours: full stage 2 vs LoRA (vs QLoRA), one run

Reference size: CLIP ViT 4 layers x 256 (MLP 1024, 4 heads) at 112 px with 14 px patches (64 image tokens),
LLaMA 4 layers x 512 (MLP 1376, 8 heads), vocab 8192, sequence 256, batch 8, fp32, stage 2 (projector + LLM train,
vision tower frozen), AdamW (no weight decay) with global-norm clipping 1.0.

Both sides get the same random weights (ours exported with `export_hf_llava`, loaded by `from_pretrained`) and
the same batch (one image of 64 tokens per sample after BOS, the rest text, prompt unsupervised); their first
losses are printed as a check that they compute the same thing. Timing: --repeats rounds, each timing --steps
steps of ours then of torch (alternating which goes first); the table gives the median round (and the best one).
tokens/s = real (non-padding) tokens / step time, samples/s beside it. MFU = model FLOPs of the real work
(`train.flops.work_flops` of `train.step.batch_work`: 6N/token where a module trains, 4N where only the gradient
passes, 2N forward only, plus attention per sample) / step time / the MEASURED fp32
matmul peak of this machine (best of a large `jnp.dot`). Peak memory: RSS growth while each side builds and runs
its first steps (ours before torch exists), and XLA's memory analysis of the compiled step. CPU s (user + sys of
all threads per step) and page faults per step come from getrusage around each side's rounds; on a machine shared
with other processes compare those, and see bench/README.md (torch's OpenMP spin-wait, glibc returning XLA's
temporary buffer to the OS every step).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from configs import common  # noqa: E402
from llava_jax import sharding  # noqa: E402
from llava_jax.models.config import LlamaConfig, LlavaConfig, VisionConfig  # noqa: E402
from llava_jax.models.llava import abstract_params, init_params  # noqa: E402
from llava_jax.models.lora import LoraSpec  # noqa: E402
from llava_jax.train import flops, partition, setup as setup_lib  # noqa: E402
from llava_jax.data.tokenize import IGNORE_INDEX  # noqa: E402
from llava_jax.train.step import batch_work  # noqa: E402

STAGES = {1: common.STAGE1_TRAINABLE, 2: common.STAGE2_TRAINABLE}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group('model (defaults: the reference size)')
  g.add_argument('--vision-layers', type=int, default=4)
  g.add_argument('--vision-width', type=int, default=256)
  g.add_argument('--vision-mlp', type=int, default=1024)
  g.add_argument('--vision-heads', type=int, default=4)
  g.add_argument('--image-size', type=int, default=112)
  g.add_argument('--patch-size', type=int, default=14)
  g.add_argument('--text-layers', type=int, default=4)
  g.add_argument('--text-width', type=int, default=512)
  g.add_argument('--text-mlp', type=int, default=1376)
  g.add_argument('--text-heads', type=int, default=8)
  g.add_argument('--kv-heads', type=int, default=None, help='default: --text-heads (no grouped-query attention)')
  g.add_argument('--vocab', type=int, default=8192)
  g.add_argument('--projector', default='mlp2x_gelu', choices=('linear', 'mlp2x_gelu'))
  g = p.add_argument_group('step')
  g.add_argument('--batch', type=int, default=8)
  g.add_argument('--seq', type=int, default=256)
  g.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='compute dtype (torch: autocast to it); trainable params stay fp32')
  g.add_argument('--stage', type=int, default=2, choices=(1, 2), help='1: projector trains; 2: projector + LLM')
  g.add_argument('--remat', default='none', choices=('none', 'full', 'dots', 'dots_no_batch'),
                 help='our remat policy (torch runs without gradient checkpointing)')
  g = p.add_argument_group('measurement')
  g.add_argument('--steps', type=int, default=3, help='timed steps per round and side')
  g.add_argument('--repeats', type=int, default=5, help='rounds; the table reports the median round')
  g.add_argument('--warmup', type=int, default=2, help='untimed steps per side before the rounds')
  g.add_argument('--no-torch', action='store_true', help='time ours only')
  g.add_argument('--peak-size', type=int, default=2048, help='n of the n x n fp32 jnp.dot giving the peak')
  g.add_argument('--profile', metavar='DIR', default=None,
                 help='after timing, trace 3 of our steps with jax.profiler into DIR and print XLA ops by time')
  g.add_argument('--seed', type=int, default=0)
  g.add_argument('--lora', type=int, default=0, metavar='R',
                 help='time full stage 2 against LoRA rank R (alpha 2R, dropout 0.05, the LLM Linears but lm_head), '
                      'ours only, side by side')
  g.add_argument('--base-bits', type=int, default=0, choices=(0, 8, 4), help='with --lora: also QLoRA at these bits')
  return p.parse_args(argv)


def model_config(a) -> LlavaConfig:
  vision = VisionConfig(hidden_size=a.vision_width, intermediate_size=a.vision_mlp, num_layers=a.vision_layers,
                        num_heads=a.vision_heads, patch_size=a.patch_size, image_size=a.image_size)
  text = LlamaConfig(vocab_size=a.vocab, hidden_size=a.text_width, intermediate_size=a.text_mlp,
                     num_layers=a.text_layers, num_heads=a.text_heads, num_kv_heads=a.kv_heads or a.text_heads,
                     max_position_embeddings=max(2048, a.seq))
  return LlavaConfig(vision=vision, text=text, projector=a.projector, image_token_id=a.vocab - 1, dtype=a.dtype,
                     param_dtype='float32', remat_policy=a.remat)


def make_batch(config: LlavaConfig, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
  """[BOS, 64 image tokens, prompt ..., answer ...]: labels supervise the second half of the text."""
  n_img = config.num_image_tokens
  if seq < n_img + 4:
    raise ValueError(f'--seq {seq} leaves no room for text after {n_img} image tokens')
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, config.image_token_id, (batch, seq), dtype=np.int32)
  ids[:, 0] = 1
  ids[:, 1:1 + n_img] = config.image_token_id
  labels = ids.copy()
  labels[:, :1 + n_img + (seq - 1 - n_img) // 2] = IGNORE_INDEX
  size = config.vision.image_size
  pixels = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
  return {'input_ids': ids, 'labels': labels, 'attention_mask': np.ones_like(ids), 'pixel_values': pixels}


class PeakRSS:
  """Peak RSS of this process while `track()` is open, sampled every 2 ms on a thread (off while timing steps)."""

  def __init__(self):
    self._proc = psutil.Process()

  def now(self) -> int:
    return self._proc.memory_info().rss

  @contextlib.contextmanager
  def track(self):
    """Yields a dict whose 'growth' = peak RSS inside the block - RSS at its start."""
    out, done = {'growth': 0}, threading.Event()
    base = peak = self.now()

    def sample():
      nonlocal peak
      while not done.wait(0.002):
        peak = max(peak, self.now())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
      yield out
    finally:
      done.set()
      thread.join()
      out['growth'] = max(peak, self.now()) - base


def mib(n: float) -> str:
  return f'{n / 2**20:,.0f} MiB'


# ------------------------------------------------------------------------------------------------------- ours


def build_ours(config: LlavaConfig, a, params, batch_np, lora=None, base_bits: int = 0):
  optim = common.stage_config().optim
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  t = time.perf_counter()
  rules = common.LORA_TRAINABLE if lora is not None else STAGES[a.stage]
  setup = setup_lib.create(config, rules, optim, total_steps=10**6, mesh=mesh, global_batch=a.batch,
                           seq_len=a.seq, lora=lora, base_bits=base_bits)
  if lora is not None:  # factors as training starts them: A random, B = 0
    params = dict(params, lora=jax.device_get(init_params(config, jax.random.key(a.seed), lora=lora)['lora']))
  compile_s = time.perf_counter() - t
  state, frozen = setup_lib.init_state(setup, params)
  batch = setup_lib.make_global_batch(setup, batch_np)
  box = {'state': state}

  def run(n: int) -> float:
    """n steps; returns the last loss (blocks)."""
    metrics = {'loss': float('nan')}
    for _ in range(n):
      box['state'], metrics = setup.step(box['state'], frozen, batch)
    return float(metrics['loss'])

  return setup, run, compile_s


# ------------------------------------------------------------------------------------------------------ torch


def torch_trainer(config: LlavaConfig, a, params):
  """transformers' LlavaForConditionalGeneration with our weights, the stage's trainable parts and AdamW.
  Returns (step(torch batch) -> loss, number of trainable params, torch threads)."""
  import torch
  import transformers

  from llava_jax.convert import export_hf_llava

  with tempfile.TemporaryDirectory() as tmp:
    export_hf_llava(tmp, config, params, dtype='float32')
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
  model.train()
  trainable = ('multi_modal_projector',) + (('language_model', 'lm_head') if a.stage == 2 else ())
  for name, p in model.named_parameters():
    p.requires_grad_(any(part in name for part in trainable))
  optim = common.stage_config().optim
  params_t = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params_t, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                          weight_decay=optim.weight_decay)
  autocast = a.dtype == 'bfloat16'

  def step(batch):
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
      loss = model(**batch).loss
    loss.backward()
    if optim.clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(params_t, optim.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  step.model, step.optimizer, step.params, step.clip_norm = model, opt, params_t, optim.clip_norm  # bench/epoch.py
  return step, sum(p.numel() for p in params_t), torch.get_num_threads()


def torch_batch(batch_np: dict) -> dict:
  """Our numpy batch as transformers takes it (int64 ids, NCHW pixels)."""
  import torch
  batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch_np.items() if k != 'pixel_values'}
  if 'pixel_values' in batch_np:
    batch['pixel_values'] = torch.from_numpy(batch_np['pixel_values'].transpose(0, 3, 1, 2).copy())
  return batch


def build_torch(config: LlavaConfig, a, params, batch_np):
  step, n_trainable, threads = torch_trainer(config, a, params)
  batch = torch_batch(batch_np)

  def run(n: int) -> float:
    last = float('nan')
    for _ in range(n):
      last = step(batch)
    return float(last)

  return run, n_trainable, threads


# ---------------------------------------------------------------------------------------------------- profile


def profile_ours(run, hlo_text: str, out_dir: str, steps: int = 3, top: int = 40):
  """Trace `steps` of our steps with jax.profiler and print XLA ops by time per step, each with its HLO line.

  Per op: the median duration of its calls times its calls per step (a median resists other load on the machine).
  Ops run concurrently on the thread pool, so the column can add up to more than the step time.
  """
  import collections
  import glob
  import gzip
  import json
  import re
  run(1)
  with jax.profiler.trace(out_dir, create_perfetto_trace=True):
    run(steps)
  files = sorted(glob.glob(os.path.join(out_dir, '**', '*.trace.json.gz'), recursive=True), key=os.path.getmtime)
  if not files:
    print(f'no perfetto trace found under {out_dir}')
    return
  with gzip.open(files[-1]) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  # op name -> 'shape opcode' (fusions: the notable ops they hold, e.g. 'fusion[dot]', 'fusion[transpose,exp]').
  bodies, comp, hlo, calls = collections.defaultdict(set), None, {}, {}
  for line in hlo_text.splitlines():
    head = re.match(r'(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if head and not line.startswith(' '):
      comp = head.group(1)
      continue
    m = re.match(r'\s+(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(', line)
    if m:
      hlo[m.group(1)] = (m.group(2), m.group(3))
      bodies[comp].add(m.group(3))
      c = re.search(r'calls=%?([\w.\-]+)', line)
      if c:
        calls[m.group(1)] = c.group(1)
  notable = ('dot', 'convolution', 'transpose', 'copy', 'reduce', 'exponential', 'scatter', 'gather', 'pad',
             'dynamic-update-slice', 'select', 'broadcast')
  for name, (shape, op) in hlo.items():
    inner = [o for o in notable if o in bodies.get(calls.get(name), ())]
    hlo[name] = f'{shape} {op}' + (f'[{",".join(inner[:4])}]' if inner else '')
  durations = collections.defaultdict(list)
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e and e['name'] in hlo:
      durations[e['name']].append(e['dur'] / 1e3)
  rows = sorted(((statistics.median(d) * len(d) / steps, len(d) / steps, name) for name, d in durations.items()),
                reverse=True)
  total = sum(r[0] for r in rows)
  print(f'\nXLA ops by time (ms per step; sum {total:.0f} ms over {len(rows)} ops; trace: {files[-1]})')
  for ms, calls, name in rows[:top]:
    print(f'{ms:9.1f} {calls:4.0f}x  {name[:36]:36} {hlo[name][:90]}')


# ------------------------------------------------------------------------------------------------------- main


def timed(fn, steps: int) -> dict[str, float]:
  """Run `fn(steps)`; per step: wall seconds, CPU seconds of this process (user + sys, all threads), page faults."""
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  fn(steps)
  t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
  return {'wall': (t1 - t0) / steps, 'user': (r1.ru_utime - r0.ru_utime) / steps,
          'sys': (r1.ru_stime - r0.ru_stime) / steps, 'faults': (r1.ru_minflt - r0.ru_minflt) / steps}


def mib1(n: float) -> str:
  return f'{n / 2**20:,.1f} MiB'


def compare_lora(a, config: LlavaConfig, params, batch_np, rss) -> None:
  """Full stage 2, LoRA (and QLoRA) of ours on the same weights and batch: step time and memory side by side."""
  spec = LoraSpec(rank=a.lora, alpha=2.0 * a.lora, dropout=0.05, targets=common.LORA_TARGETS)
  variants = [('full stage 2', {}), (f'LoRA r{a.lora}', dict(lora=spec))]
  if a.base_bits:
    variants.append((f'QLoRA {a.base_bits}-bit', dict(lora=spec, base_bits=a.base_bits)))
  sides = []
  for name, kw in variants:
    with rss.track() as grow:
      setup, run, compile_s = build_ours(config, a, params, batch_np, **kw)
      first = run(1)
      run(a.warmup)
    print(f'{name}: compiled in {compile_s:.1f} s, first loss {first:.6f}')
    sides.append((name, setup, run, grow))
  rounds: dict[str, list[float]] = {name: [] for name, *_ in sides}
  for r in range(a.repeats):
    for name, _, run, _ in (sides if r % 2 == 0 else sides[::-1]):
      rounds[name].append(timed(run, a.steps)['wall'])
  n_tokens = float(batch_work(batch_np, config.image_token_id)['real_tokens'])
  print(f'\n{"":14} {"step ms":>8} {"tokens/s":>9} {"trainable":>11} {"opt state":>10} {"frozen":>10} '
        f'{"XLA args":>10} {"XLA temps":>10} {"peak RSS +":>11}')
  for name, setup, _, grow in sides:
    wall = statistics.median(rounds[name])
    m = setup.step.memory_analysis()
    state = setup.abstract_state
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    print(f'{name:14} {wall * 1e3:8.1f} {n_tokens / wall:9.0f} {n_train:11,} '
          f'{mib1(partition.tree_bytes(state.opt_state)):>10} {mib1(partition.tree_bytes(setup.abstract_frozen)):>10} '
          f'{mib1(m.argument_size_in_bytes):>10} {mib1(m.temp_size_in_bytes):>10} {mib1(grow["growth"]):>11}')
  full = statistics.median(rounds['full stage 2'])
  print('(median step over rounds, run side by side in alternating order; ' +
        ', '.join(f'{n} / full step time {statistics.median(rounds[n]) / full:.2f}x' for n, *_ in sides[1:]) + ')')


def main(argv=None):
  a = parse_args(argv)
  config = model_config(a)
  rss = PeakRSS()
  env = ' '.join(f'{k}={os.environ[k]}' for k in sorted(os.environ) if k.startswith(('OMP_', 'MALLOC_', 'XLA_')))
  print(f'devices: {jax.devices()}  cpu cores: {os.cpu_count()}  load average: {os.getloadavg()}  '
        f'env: {env or "(no OMP_/MALLOC_/XLA_ variables)"}')
  print(f'model: vision {a.vision_layers}x{a.vision_width} @{a.image_size}px/{a.patch_size} '
        f'({config.num_image_tokens} image tokens), LLM {a.text_layers}x{a.text_width} mlp {a.text_mlp} '
        f'heads {a.text_heads}/{config.text.num_kv_heads}, vocab {a.vocab}; batch {a.batch} x seq {a.seq}, '
        f'{a.dtype}, stage {a.stage}, remat {a.remat}')

  # Other load lowers a measured peak: keep the best of a measurement before and one after the rounds.
  peak = flops.measure_matmul_peak('float32', n=a.peak_size, reps=10)
  params = jax.device_get(init_params(config, jax.random.key(a.seed)))
  batch_np = make_batch(config, a.batch, a.seq, a.seed)
  if a.lora:
    return compare_lora(a, config, params, batch_np, rss)
  with rss.track() as ours_rss:
    setup, ours, compile_s = build_ours(config, a, params, batch_np)
    print(f'our step: lowered + compiled ahead of time in {compile_s:.1f} s')
    print(setup.memory)
    loss_ours = ours(1)
    ours(a.warmup)
  # Real work only (no padding in this batch, but counted the way the trainer counts it): train.step.batch_work.
  work = {k: float(v) for k, v in batch_work(batch_np, config.image_token_id).items()}
  n_tokens, n_samples = work['real_tokens'], work['samples']
  pad = 1.0 - n_tokens / (a.batch * a.seq)
  step_flops = flops.work_flops(flops.unit_flops(config, setup.mask, abstract_params(config)), n_tokens,
                                work['attention_pairs'], work['images'])
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))

  torch_run, torch_rss = None, {'growth': 0}
  if not a.no_torch:
    with rss.track() as torch_rss:
      torch_run, n_train_t, threads = build_torch(config, a, params, batch_np)
      loss_torch = torch_run(1)
      torch_run(a.warmup)
    print(f'torch {__import__("torch").__version__}, {threads} threads; trainable params: ours {n_train:,}, '
          f'torch {n_train_t:,}')
    print(f'first-step loss (same weights, same batch): ours {loss_ours:.6f}, torch {loss_torch:.6f}')
  else:
    print(f'first-step loss: ours {loss_ours:.6f}')

  sides = [('ours', ours)] + ([] if torch_run is None else [('torch', torch_run)])
  rounds: dict[str, list[dict[str, float]]] = {name: [] for name, _ in sides}
  for r in range(a.repeats):
    for name, fn in (sides if r % 2 == 0 else sides[::-1]):
      rounds[name].append(timed(fn, a.steps))
    line = '  '.join(f'{k} {statistics.median(x["wall"] for x in v) * 1e3:.0f} ms' for k, v in rounds.items())
    print(f'round {r + 1}/{a.repeats}: {line} (median so far)', flush=True)
  peak = max(peak, flops.measure_matmul_peak('float32', n=a.peak_size, reps=10))

  print(f'\nstep: {step_flops / 1e9:.2f} GFLOP (model), {n_tokens:.0f} real tokens, {n_samples:.0f} samples, pad '
        f'fraction {pad:.2f}; measured fp32 matmul peak '
        f'({a.peak_size}^2 jnp.dot, best of 20) {peak / 1e9:.1f} GFLOP/s; load average now {os.getloadavg()[0]:.1f}')
  print(f'{"":6} {"step ms":>8} {"(best)":>7} {"tokens/s":>9} {"(best)":>7} {"samples/s":>9} {"MFU":>6} {"CPU s":>6} '
        f'{"sys s":>6} {"faults":>8} {"peak RSS +":>11}')
  med = {}
  for name, grow in [('ours', ours_rss), ('torch', torch_rss)][:len(sides)]:
    m = {k: statistics.median(x[k] for x in rounds[name]) for k in ('wall', 'user', 'sys', 'faults')}
    med[name] = m['wall']
    best = min(x['wall'] for x in rounds[name])
    print(f'{name:6} {m["wall"] * 1e3:8.1f} {best * 1e3:7.1f} {n_tokens / m["wall"]:9.0f} {n_tokens / best:7.0f} '
          f'{n_samples / m["wall"]:9.1f} '
          f'{step_flops / m["wall"] / peak:6.1%} {m["user"] + m["sys"]:6.2f} {m["sys"]:6.2f} {m["faults"]:8.0f} '
          f'{mib(grow["growth"]):>11}')
  print('(medians over rounds; CPU s = user + sys seconds of all threads per step; faults = minor page faults per '
        'step; peak RSS + = growth while that side built and ran its first steps)')
  if torch_run is not None:
    print(f'ours / torch tokens/s (median): {med["torch"] / med["ours"]:.2f}x')

  if a.profile:
    profile_ours(ours, setup.step.as_text(), a.profile)


if __name__ == '__main__':
  main()
