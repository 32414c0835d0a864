"""One epoch on LLaVA-1.5-like data: ours with fixed padding, ours packed, and transformers fed like the original.

    python bench/epoch.py                        # packing statistics + the three timed runs (bench-small model)
    python bench/epoch.py --no-train             # packing statistics only (seconds)
    python bench/epoch.py --samples 512 --max-images-per-row 3
    python bench/epoch.py --samples 96 --profile /tmp/prof   # + where one step's time goes, (b) against (c)

Part 1, packing statistics (no model): sample lengths drawn from the distributions below at the paper's shapes
(576 image tokens, rows of 2048) and at the bench shapes (64 image tokens, rows of 256: every length x 64/576),
packed by the pipeline's own planner (`pack_rows`), against fixed padding and against the original's
pad-to-longest with `group_by_modality_length` (8 devices x per-device batch; each device pads its chunk of a
sorted megabatch to its longest sample). Pad fraction = padding tokens / all token slots; image-slot padding =
unused slots / slots (each slot is a vision-tower pass).

Part 2, one epoch of `--samples` stage-2 samples (bench-scale lengths) on the bench-small model of
bench/train_step.py (ViT 4x256 @112px = 64 image tokens, LLaMA 4x512, vocab 8192, fp32, stage 2), same weights:
  (a) ours, fixed padding: the grain pipeline (TFDS ArrayRecord build of the samples), rows of 256, 8 per step;
  (b) ours, packed: the same pipeline with data.packing, rows of 512 tokens and 5 image slots (4096 x 5 at bench
      scale; the stage-2 recipe's 5120 x 6 would be 640 x 6), R rows per step with R x samples per row ~ 8
      samples per update;
  (c) transformers' LlavaForConditionalGeneration (torch, CPU), 8 samples per step, each batch padded to its
      longest sample, the order from LLaVA-1.5's group_by_modality_length as an 8-device run sees it
      (megabatch 64 = 8 x 8, each step one device's chunk).
Epoch time is the steps' time: it excludes our ahead-of-time compilation and reading the batches (each side's
batches are made before the clock starts; printed apart). real tokens/s = non-padding tokens / epoch
time, the same token count for all three. The machine is shared: the load average is printed, and CPU s (user +
sys of all threads) is the figure least moved by other processes; compare ratios from one invocation. Under load
set OMP_WAIT_POLICY=PASSIVE (torch's spinning OpenMP threads, see bench/README.md).

Part 3 (`--profile DIR`): the first `--profile-steps` batches of (b) and of (c) again, ms per step by phase. (b):
a jax.profiler trace; each XLA op's duration goes to the phase its HLO metadata names (module path; inside the
scanned layers the einsum strings and projection names), forward or backward (transpose(jvp)); op durations
overlap on the thread pool and stretch under load, so their sum exceeds the wall time. (c): forward hooks time
transformers' modules; the backward (autograd) and clip + AdamW are timed whole. The largest 25 XLA ops are listed.

Length distributions (text tokens per sample, LLaMA tokenizer, including template; + 576 image tokens when the
sample has an image; cut at 2048 as model_max_length). Source of the mix: LLaVA-1.5 (Liu et al., "Improved
Baselines with Visual Instruction Tuning", 2023, Table 7: llava_v1_5_mix665k) and LLAVA.md (LLaVA-1.5 mixes
text-only ShareGPT data). Per-source token lengths are ESTIMATES (log-normal, median and spread), not published
figures: the VQA-style sets merge all questions of an image into one multi-turn conversation with the short-answer
prompt; ShareGPT chats are long and often cut at 2048.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import numpy as np  # noqa: E402

from llava_jax.data.pipeline import PACKING_BINS, modality_grouped_order, pack_rows  # noqa: E402

# source: (samples, has image, median text tokens, log-normal sigma)
MIX665K = {
    'LLaVA-Instruct-158K (conv/detail/complex)': (158_000, True, 330, 0.45),
    'ShareGPT (text-only)': (40_000, False, 1100, 0.7),
    'VQAv2': (83_000, True, 180, 0.35),
    'GQA': (72_000, True, 200, 0.35),
    'OKVQA': (9_000, True, 90, 0.3),
    'OCRVQA': (80_000, True, 150, 0.3),
    'A-OKVQA': (66_000, True, 110, 0.3),
    'TextCaps': (22_000, True, 80, 0.25),
    'RefCOCO': (48_000, True, 250, 0.4),
    'VG': (86_000, True, 260, 0.4),
}
# Stage 1: LCS-558K BLIP captions, `plain` template (BOS + image + caption + newline).
LCS558K = {'LCS-558K captions': (558_000, True, 18, 0.35)}
STAGES = {  # stage: (mix, per-device batch of the original (8 devices), paper's global batch)
    1: (LCS558K, 32, 256),
    2: (MIX665K, 16, 128),
}
RECIPE_ROWS = {1: (3072, 5), 2: (5120, 6)}  # packed (row_length, max_images_per_row) of configs/stage{1,2}*.py
PAPER = dict(image_tokens=576, max_length=2048)
BENCH = dict(image_tokens=64, max_length=256)


def draw(mix: dict, n: int, image_tokens: int, max_length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(token lengths int64[n], images int64[n]) of n samples drawn in the mix's proportions; text lengths scale
  with image_tokens / 576 (bench shapes)."""
  rng = np.random.default_rng(seed)
  names = list(mix)
  share = np.asarray([mix[k][0] for k in names], float)
  source = rng.choice(len(names), n, p=share / share.sum())
  scale = image_tokens / PAPER['image_tokens']
  lengths, images = np.zeros(n, np.int64), np.zeros(n, np.int64)
  for s, name in enumerate(names):
    _, has_image, median, sigma = mix[name]
    idx = np.flatnonzero(source == s)
    text = np.maximum(2, np.round(median * scale * rng.lognormal(0, sigma, len(idx)))).astype(np.int64)
    lengths[idx] = np.minimum(text + (image_tokens if has_image else 0), max_length)
    images[idx] = int(has_image)
  return lengths, images


def padded_to_longest(lengths: np.ndarray, images: np.ndarray, per_device: int, devices: int = 8,
                      seed: int = 0) -> tuple[int, list[np.ndarray]]:
  """The original's token slots: group_by_modality_length over a megabatch of devices x per_device, each device
  padding its chunk to its longest sample. Returns (slots, chunks of sample indices)."""
  signed = np.where(images > 0, lengths, -lengths)
  order = modality_grouped_order(signed, per_device * devices, devices, np.random.default_rng(seed))
  chunks = [order[i:i + per_device] for i in range(0, len(order), per_device)]
  return sum(len(c) * int(lengths[c].max()) for c in chunks), chunks


def packing_table(n: int, bins: int) -> None:
  print(f'\n== packing statistics: {n} samples per stage drawn from the distributions in the docstring; '
        f'{bins} open rows ==')
  print(f'{"stage":5} {"shapes":22} {"fixed pad":>9} {"longest pad":>11} {"row x slots":>11} {"packed pad":>10} '
        f'{"samples/row":>11} {"img slot pad":>12} {"rows/update":>11}')
  for stage, (mix, per_device, batch) in STAGES.items():
    for label, shape in (('paper (576 img, 2048)', PAPER), ('bench (64 img, 256)', BENCH)):
      lengths, images = draw(mix, n, shape['image_tokens'], shape['max_length'])
      real = lengths.sum()
      fixed = 1 - real / (n * shape['max_length'])
      longest = 1 - real / padded_to_longest(lengths, images, per_device)[0]
      for row, slots in ((2048, 3), RECIPE_ROWS[stage]):
        row = row * shape['max_length'] // PAPER['max_length']
        ids, starts = pack_rows(np.random.default_rng(1).permutation(n), lengths, images, row_length=row,
                                max_images=slots, num_bins=bins)
        rows = len(starts) - 1
        print(f'{stage:5} {label:22} {fixed:9.1%} {longest:11.1%} {f"{row} x {slots}":>11} '
              f'{1 - real / (rows * row):10.1%} {n / rows:11.2f} {1 - images.sum() / (rows * slots):12.1%} '
              f'{batch * rows / n:11.1f}')
  print("(row x slots: 2048 x 3, and the recipe's packed rows (configs/stage*.py) scaled to the shapes; rows/update: "
        "packed rows per update that keep the paper's samples per update: 256 at stage 1, 128 at stage 2)")


# ----------------------------------------------------------------------------------------------- timed runs

def write_dataset(root: str, lengths: np.ndarray, images: np.ndarray, image_size: int, tok_words: int):
  """LLaVA JSON + images + a word-level tokenizer (one token per word) whose samples tokenize to exactly
  `lengths` under TEMPLATE with 64 image tokens. Returns (json path, image dir, tokenizer)."""
  from llava_jax.data.tokenize import add_image_token, tokenize_conversation
  from PIL import Image
  tok = word_tokenizer(tok_words)
  add_image_token(tok)
  os.makedirs(os.path.join(root, 'images'))
  rng = np.random.default_rng(0)
  for i in range(8):
    Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), np.uint8)).save(
        os.path.join(root, 'images', f'{i}.png'))
  words = [f'w{i}' for i in range(tok_words)]

  def conv(n_q, n_a, image):
    q = ' '.join(rng.choice(words, n_q))
    return [{'from': 'human', 'value': ('<image>\n' if image else '') + q},
            {'from': 'gpt', 'value': ' '.join(rng.choice(words, n_a))}]

  overhead = {img: len(tokenize_conversation(conv(1, 1, img), tok, TEMPLATE, BENCH['image_tokens'])['input_ids']) - 2
              for img in (False, True)}
  samples = []
  for i, (n, k) in enumerate(zip(lengths.tolist(), images.tolist())):
    text = max(2, n - overhead[bool(k)])
    n_q = max(1, text // 3)
    s = {'id': f'b{i}', 'conversations': conv(n_q, max(1, text - n_q), bool(k))}
    if k:
      s['image'] = f'{i % 8}.png'
    samples.append(s)
  path = os.path.join(root, 'train.json')
  with open(path, 'w') as f:
    json.dump(samples, f)
  return path, os.path.join(root, 'images'), tok


def word_tokenizer(n_words: int):
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(['<unk>', '<s>', '</s>', '<pad>', 'USER', 'ASSISTANT', ':'] +
                                      [f'w{i}' for i in range(n_words)])}
  tk = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token='<s>', eos_token='</s>', unk_token='<unk>',
                                 pad_token='<pad>')


def _template():
  from llava_jax.data.conversation import Template
  # vicuna_v1's layout without its system prompt, whose fixed ~35 tokens would not scale to the bench shapes.
  return Template('bench_v1', 'two', '', ('USER', 'ASSISTANT'), ' ')


TEMPLATE = None  # set in main (imports llava_jax.data.conversation)


def epoch_ours(setup, params, pipeline) -> dict:
  from llava_jax.train import setup as setup_lib
  state, frozen = setup_lib.init_state(setup, params)
  keys = setup.abstract_batch.keys()
  # The batches are read first, as torch's are built first: the epoch time is the steps' (the original overlaps
  # loading with its DataLoader workers; ours with worker processes); reading is printed apart.
  t = time.perf_counter()
  batches = [{k: local[k] for k in keys} for local in pipeline]
  load_s = time.perf_counter() - t
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  loss = None
  for local in batches:
    state, m = setup.step(state, frozen, setup_lib.make_global_batch(setup, local))
    loss = m['loss']
  float(loss)
  t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
  s = pipeline.stats()
  return dict(state=(state, frozen), batches=batches, time=t1 - t0,
              cpu=r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, steps=len(batches),
              slots=s['tokens'], real=s['tokens'] - s['pad_tokens'], samples=s['samples'], load=load_s)


def epoch_torch(step, chunks, samples, config) -> dict:
  from train_step import torch_batch
  from llava_jax.data.tokenize import IGNORE_INDEX
  size = config.vision.image_size
  rng = np.random.default_rng(0)
  batches = []
  for c in chunks:  # as the original's collator: pad to the longest in the batch, pixel_values only with images
    n = max(len(samples[i]['input_ids']) for i in c)
    ids = np.zeros((len(c), n), np.int32)
    labels = np.full((len(c), n), IGNORE_INDEX, np.int32)
    mask = np.zeros((len(c), n), np.int32)
    for r, i in enumerate(c):
      m = len(samples[i]['input_ids'])
      ids[r, :m], labels[r, :m], mask[r, :m] = samples[i]['input_ids'], samples[i]['labels'], 1
    b = dict(input_ids=ids, labels=labels, attention_mask=mask)
    with_image = [samples[i]['num_images'] > 0 for i in c]
    if any(with_image):
      b['pixel_values'] = rng.standard_normal((sum(with_image), size, size, 3), dtype=np.float32)
    batches.append(torch_batch(b))
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for b in batches:
    loss = step(b)
  float(loss)
  t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
  slots = sum(int(b['input_ids'].numel()) for b in batches)
  real = sum(int(b['attention_mask'].sum()) for b in batches)
  return dict(batches=batches, time=t1 - t0, cpu=r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
              steps=len(batches), slots=slots, real=real, samples=sum(len(c) for c in chunks))


# ---------------------------------------------------------------------------------------------------- profile
PHASES = ('vision tower', 'projector', 'attention (q/k/v/o + scores)', 'MLP', 'layer scan (slices, stacking)',
          'norms, embed, merge', 'LM head + loss', 'optimizer + clipping')


def _phase(op_name: str) -> str:
  """Phase of one XLA op from its metadata op_name (the flax module path of the op)."""
  if 'vision_tower' in op_name:
    return 'vision tower'
  if 'projector' in op_name:
    return 'projector'
  if 'jvp(' not in op_name and 'transpose(' not in op_name:
    return 'optimizer + clipping'  # outside value_and_grad: AdamW, clipping, the update
  # Inside the scanned layers flax module names are gone (closed_call/layers/...): the einsum strings say it.
  if any(k in op_name for k in ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'attention', 'softmax', 'rope', 'bkqs',
                                'bkhs', 'bkqh', '/exp', 'reduce_max')):
    return 'attention (q/k/v/o + scores)'
  if 'dynamic_slice' in op_name or 'dynamic_update_slice' in op_name:
    return 'layer scan (slices, stacking)'
  if any(k in op_name for k in ('gate_proj', 'up_proj', 'down_proj', 'mlp')):
    return 'MLP'
  if 'lm_head' in op_name or 'layers_' not in op_name and ('log_softmax' in op_name or 'loss' in op_name):
    return 'LM head + loss'
  return 'norms, embed, merge'


def profile_ours(setup, state, batches, out_dir: str) -> dict:
  """CPU ms per step of our XLA ops by phase (forward / backward), from a jax.profiler trace of `batches`."""
  import collections
  import glob
  import gzip
  import re
  import jax
  from llava_jax.train import setup as setup_lib
  meta = {}
  for line in setup.step.as_text().splitlines():  # instruction -> op_name (fusions: their root's)
    m = re.match(r'\s+(?:ROOT )?%?([\w.\-]+) = .*op_name="([^"]*)"', line)
    if m:
      meta[m.group(1)] = m.group(2)
  state, frozen = state
  state, _ = setup.step(state, frozen, setup_lib.make_global_batch(setup, batches[0]))  # warm
  with jax.profiler.trace(out_dir):
    for b in batches:
      state, m = setup.step(state, frozen, setup_lib.make_global_batch(setup, b))
    float(m['loss'])
  files = sorted(glob.glob(os.path.join(out_dir, '**', '*.trace.json.gz'), recursive=True), key=os.path.getmtime)
  with gzip.open(files[-1]) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  ms, other = collections.Counter(), collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in meta:
      op, dur = meta[e['name']], e['dur'] / 1e3 / len(batches)
      phase = _phase(op)
      ms[(phase, 'update' if phase == PHASES[-1] else 'backward' if 'transpose(' in op else 'forward')] += dur
      other[(phase, e['name'], op)] += dur
  print('\n(b) largest XLA ops (ms per step, phase, instruction, op_name):')
  for (phase, name, op), dur in other.most_common(25):
    print(f'  {dur:7.1f}  {phase[:12]:12} {name[:24]:24} {op[-110:]}')
  return ms


def profile_torch(train_step_fn, batches) -> dict:
  """Wall ms per step of transformers' modules by phase: forward hooks per module, backward and optimizer whole."""
  import collections
  import torch
  model, opt = train_step_fn.model, train_step_fn.optimizer
  ms, t = collections.Counter(), {}

  def model_step(b):
    t0 = time.perf_counter()
    loss = model(**b).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(train_step_fn.params, train_step_fn.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ms.update({('forward', 'total'): t1 - t0, ('backward (all phases)', 'backward'): t2 - t1,
               ('optimizer + clipping', 'update'): time.perf_counter() - t2})

  lm = model.model.language_model
  parts = [('vision tower', model.model.vision_tower), ('projector', model.model.multi_modal_projector),
           ('LM head + loss', model.lm_head)]
  for layer in lm.layers:
    parts += [('attention (q/k/v/o + scores)', layer.self_attn), ('MLP', layer.mlp)]
  for name, mod in parts:
    mod.register_forward_pre_hook(lambda m, i, name=name: t.__setitem__(name, time.perf_counter()))
    mod.register_forward_hook(lambda m, i, o, name=name: ms.update({(name, 'forward'): time.perf_counter() - t[name]}))
  model_step(batches[0])  # warm
  ms.clear()
  for b in batches:
    model_step(b)
  out = collections.Counter({k: v * 1e3 / len(batches) for k, v in ms.items()})
  forward = out.pop(('forward', 'total'))
  out[('norms, embed, merge', 'forward')] = forward - sum(v for (_, d), v in out.items() if d == 'forward')
  return out


def print_profile(ours: dict, torch_ms: dict, wall: tuple, real: tuple) -> None:
  print(f'\n== profile: ms per step by phase ((b): XLA op time summed over threads, from jax.profiler; (c): wall '
        f'time of module forwards via hooks, backward and optimizer whole) ==')
  print(f'{"phase":32} {"(b) fwd":>8} {"(b) bwd":>8} {"(b) all":>8} {"(c) fwd":>8} {"(c) bwd":>8} {"(c) all":>8}')
  tb, tc = ours, torch_ms
  for p in PHASES + ('backward (all phases)',):
    fb, bb, fc, bc = tb[(p, 'forward')], tb[(p, 'backward')], tc[(p, 'forward')], tc[(p, 'backward')]
    print(f'{p:32} {fb:8.1f} {bb:8.1f} {fb + bb + tb[(p, "update")]:8.1f} {fc:8.1f} {bc:8.1f} '
          f'{fc + bc + tc[(p, "update")]:8.1f}')
  print(f'{"total":32} {sum(v for (p, d), v in tb.items() if d == "forward"):8.1f} '
        f'{sum(v for (p, d), v in tb.items() if d == "backward"):8.1f} {sum(tb.values()):8.1f} '
        f'{sum(v for (p, d), v in tc.items() if d == "forward"):8.1f} '
        f'{sum(v for (p, d), v in tc.items() if d == "backward"):8.1f} {sum(tc.values()):8.1f}')
  print(f'wall ms per step in the epoch: (b) {wall[0]:.0f}, (c) {wall[1]:.0f}; real tokens per step: (b) '
        f'{real[0]:.0f}, (c) {real[1]:.0f}. (c)\'s backward is one figure (autograd); its optimizer row is '
        f'clip_grad_norm_ + AdamW.step')


def timed_runs(a) -> None:
  global TEMPLATE
  TEMPLATE = _template()
  import dataclasses
  import jax
  import train_step
  from configs import common
  from llava_jax import sharding
  from llava_jax.data.builder import build_dataset
  from llava_jax.data.pipeline import make_pipeline, open_source
  from llava_jax.data.tokenize import tokenize_conversation
  from llava_jax.models.llava import init_params
  from llava_jax.train import setup as setup_lib

  targs = train_step.parse_args([])
  config = train_step.model_config(targs)
  max_len, batch = BENCH['max_length'], 8
  lengths, images = draw(MIX665K, a.samples, BENCH['image_tokens'], max_len, seed=a.seed)
  root = tempfile.mkdtemp(prefix='bench_epoch_')
  try:
    path, image_dir, tok = write_dataset(root, lengths, images, config.vision.image_size, 400)
    config = dataclasses.replace(config, image_token_id=tok.convert_tokens_to_ids('<image>'))
    data_dir = build_dataset({'train': path}, image_dir, os.path.join(root, 'tfds'), name='bench',
                             progress_every=0)['data_dir']
    source = open_source(data_dir, 'train')
    samples = [tokenize_conversation(json.loads(source[i]['conversations']), tok, TEMPLATE, BENCH['image_tokens'],
                                     max_len) for i in range(len(source))]
    real_lengths = np.asarray([len(s['input_ids']) for s in samples])
    args = dict(split='train', tokenizer=tok, template=TEMPLATE, num_image_tokens=config.num_image_tokens,
                image_size=config.vision.image_size, image_aspect='square', max_length=max_len, seed=a.seed,
                num_epochs=1, process_index=0, process_count=1)
    probe = make_pipeline(data_dir, global_batch_size=1, packing=True, row_length=a.row_length,
                          max_images_per_row=a.max_images_per_row, **args)
    rows_per_epoch = probe.num_steps
    per_row = len(samples) / rows_per_epoch
    rows = max(1, round(batch / per_row))
    print(f'\n== one epoch, stage 2 at bench shapes: {len(samples)} samples (mean {real_lengths.mean():.0f} tokens, '
          f'{(images == 0).mean():.0%} text-only), model of bench/train_step.py, fp32; {per_row:.2f} samples per '
          f'packed row of {a.row_length} tokens, {a.max_images_per_row} image slots -> (b) takes {rows} rows per step ==')
    params = jax.device_get(init_params(config, jax.random.key(a.seed)))
    optim = common.stage_config().optim
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    results = {}
    for name, packing, gb in (('(a) ours, fixed padding', False, batch), ('(b) ours, packed', True, rows)):
      t = time.perf_counter()
      setup = setup_lib.create(config, common.STAGE2_TRAINABLE, optim, 10**6, mesh, global_batch=gb,
                               seq_len=a.row_length if packing else max_len,
                               packed=packing, image_slots=a.max_images_per_row if packing else None)
      print(f'{name}: compiled in {time.perf_counter() - t:.1f} s (not in the epoch time)', flush=True)
      pipe = make_pipeline(data_dir, global_batch_size=gb, packing=packing, row_length=a.row_length,
                           max_images_per_row=a.max_images_per_row, **args)
      results[name] = epoch_ours(setup, params, pipe)
      print(f'{name}: {results[name]["time"]:.1f} s (+ {results[name]["load"]:.1f} s reading the batches first), '
            f'load average {os.getloadavg()[0]:.1f}', flush=True)
    if not a.no_torch:
      step, _, threads = train_step.torch_trainer(config, targs, params)
      _, chunks = padded_to_longest(real_lengths, images, batch, seed=a.seed)
      name = f'(c) torch, pad to longest + grouping ({threads} threads)'
      results[name] = epoch_torch(step, chunks, samples, config)
      print(f'{name}: {results[name]["time"]:.1f} s, load average {os.getloadavg()[0]:.1f}', flush=True)
      if a.profile:
        b, c = results['(b) ours, packed'], results[name]
        n = a.profile_steps
        ours_ms = profile_ours(setup, b['state'], b['batches'][:n], a.profile)
        torch_ms = profile_torch(step, c['batches'][:n])
        print_profile(ours_ms, torch_ms, (b['time'] / b['steps'] * 1e3, c['time'] / c['steps'] * 1e3),
                      (b['real'] / b['steps'], c['real'] / c['steps']))
        print(f'load average after the profile: {os.getloadavg()}')
  finally:
    shutil.rmtree(root, ignore_errors=True)

  print(f'\n{"run":46} {"steps":>5} {"epoch s":>8} {"CPU s":>7} {"real tok/s":>10} {"samples/s":>9} {"pad":>6}')
  for name, r in results.items():
    print(f'{name:46} {r["steps"]:5d} {r["time"]:8.1f} {r["cpu"]:7.1f} {r["real"] / r["time"]:10.0f} '
          f'{r["samples"] / r["time"]:9.2f} {1 - r["real"] / r["slots"]:6.1%}')
  names = list(results)
  base = results[names[1]]['real'] / results[names[1]]['time']
  for other in names[:1] + names[2:]:
    ratio = base / (results[other]['real'] / results[other]['time'])
    cpu = (results[other]['cpu'] / results[other]['real']) / (results[names[1]]['cpu'] / results[names[1]]['real'])
    print(f'(b) / {other.split(",")[0]} real tokens/s: {ratio:.2f}x (per CPU second: {cpu:.2f}x)')
  print(f'load average at the end: {os.getloadavg()}')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--samples', type=int, default=192, help='samples in the timed epoch')
  p.add_argument('--stat-samples', type=int, default=20000, help='samples per stage in the packing statistics')
  # 512 x 5: 4096 x 5 at bench scale (the shape of the tables in bench/README.md); the recipe's 5120 x 6 is 640 x 6
  p.add_argument('--row-length', type=int, default=512, help="run (b)'s packed row length")
  p.add_argument('--max-images-per-row', type=int, default=5, help="run (b)'s image slots per row")
  p.add_argument('--bins', type=int, default=PACKING_BINS, help='open rows of the first-fit packer')
  p.add_argument('--no-train', action='store_true', help='packing statistics only')
  p.add_argument('--no-torch', action='store_true', help='skip run (c)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--profile', metavar='DIR', default=None,
                 help="after the runs, profile (b) (jax.profiler trace into DIR) and (c) by phase")
  p.add_argument('--profile-steps', type=int, default=4, help='steps of (b) and of (c) in the profile')
  a = p.parse_args(argv)
  print(f'cpu cores: {os.cpu_count()}  load average: {os.getloadavg()}')
  packing_table(a.stat_samples, a.bins)
  if not a.no_train:
    timed_runs(a)


if __name__ == '__main__':
  main()
