"""Generation speed: our jit-compiled KV-cache sampler vs transformers' LlavaForConditionalGeneration.generate
(PyTorch, CPU) on the same config and weights, and cached decoding vs recomputing the whole prefix.

  python bench/generate.py                       # preset 'tiny', prompt 64 tokens, 64 new tokens, batch 1 and 8
  python bench/generate.py --config small --uncached-new-tokens 256

Times are the best of --repeats warm runs (compilation excluded; the minimum resists other load on the machine). prefill tokens/s = batch * prompt_len / time
of the prompt pass; decode tokens/s = batch * (new_tokens - 1) / time of the remaining steps. Greedy, no EOS.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava_jax import generate  # noqa: E402
from llava_jax.models import presets  # noqa: E402
from llava_jax.models.config import LlamaConfig  # noqa: E402
from llava_jax.models.llava import Llava, abstract_params  # noqa: E402

CONFIGS = {
    'tiny': lambda: presets.get_model_config('tiny'),
    # A small decoder so per-token compute, not dispatch, dominates.
    'small': lambda: presets.get_model_config('tiny').replace(
        text=LlamaConfig(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
                         num_kv_heads=8, max_position_embeddings=2048), image_token_id=32000),
}


def random_params(config, seed=0, std=0.1):
  """Random weights (std 0.1 so greedy output is not one repeated token); norms 1, biases 0."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'scale'" in name or "'bias'" in name:
      return np.full(leaf.shape, 1.0 if "'scale'" in name else 0.0, np.float32)
    return rng.normal(0, std, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, abstract_params(config))


def make_inputs(config, batch, prompt_len, seed=0):
  """BOS + the image tokens + random text, all prompts of length prompt_len; NHWC pixels."""
  rng = np.random.default_rng(seed)
  n = config.num_image_tokens
  text = rng.integers(10, min(config.text.vocab_size, 30000), (batch, prompt_len - 1 - n))
  text[text == config.image_token_id] = 10
  ids = np.concatenate([np.ones((batch, 1)), np.full((batch, n), config.image_token_id), text], 1).astype(np.int32)
  size = config.vision.image_size
  pixels = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  return ids, np.ones_like(ids), pixels


def best_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def bench_ours(model, params, ids, mask, pixels, new_tokens, repeats):
  """-> (prefill seconds, decode seconds for new_tokens - 1 steps, tokens)."""
  statics = dict(sampling=generate.SamplingParams(), eos=generate.eos_array(None), pad=np.int32(0))
  max_len = ids.shape[1] + new_tokens
  key = jax.random.key(0)

  def prefill():
    return jax.block_until_ready(generate._prefill(model, params, ids, mask, pixels, key, max_len=max_len,
                                                   **statics))

  def decode(state):
    return jax.block_until_ready(generate._decode(model, params, state, new_tokens, **statics))

  out = decode(prefill())  # compile both
  t_prefill = best_time(prefill, repeats)
  times = []
  for _ in range(repeats):
    state = prefill()
    t = time.perf_counter()
    decode(state)
    times.append(time.perf_counter() - t)
  return t_prefill, min(times), np.asarray(out['tokens'])


def load_hf(config, params):
  import torch
  import transformers
  from llava_jax.convert.flax_to_hf import export_hf_llava
  with tempfile.TemporaryDirectory() as d:
    export_hf_llava(d, config, params)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(d, torch_dtype=torch.float32)
  return model.eval()


def bench_hf(model, ids, mask, pixels, new_tokens, repeats, use_cache=True):
  """-> (prefill seconds, decode seconds, tokens) for HF generate on CPU."""
  import torch
  ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
  pix_t = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
  kw = dict(do_sample=False, use_cache=use_cache, pad_token_id=0, eos_token_id=None)

  def run(n):
    with torch.no_grad():
      return model.generate(input_ids=ids_t, attention_mask=mask_t, pixel_values=pix_t, max_new_tokens=n,
                            min_new_tokens=n, **kw)

  run(2)  # warm-up
  t_prefill = best_time(lambda: run(1), repeats)
  out = run(new_tokens)
  t_total = best_time(lambda: run(new_tokens), repeats)
  return t_prefill, max(t_total - t_prefill, 1e-9), out[:, ids.shape[1]:].numpy()


def leading_agreement(a, b):
  """Tokens that agree before the first difference, averaged over the batch."""
  n = []
  for x, y in zip(a, b):
    diff = np.nonzero(x != y)[0]
    n.append(diff[0] if len(diff) else len(x))
  return float(np.mean(n))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', choices=sorted(CONFIGS), default='tiny')
  parser.add_argument('--prompt-len', type=int, default=64)
  parser.add_argument('--new-tokens', type=int, default=64)
  parser.add_argument('--batches', default='1,8')
  parser.add_argument('--uncached-new-tokens', type=int, default=256)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--skip-hf', action='store_true', help='only our sampler')
  parser.add_argument('--torch-threads', type=int, help='torch intra-op threads (default: torch\'s); on a loaded '
                      'machine 1 (with XLA_FLAGS=--xla_cpu_multi_thread_eigen=false for jax) gives stable numbers')
  args = parser.parse_args(argv)

  config = CONFIGS[args.config]()
  params_np = random_params(config)
  params = jax.device_put(params_np)
  model = Llava(config)
  print(f'config {args.config}: decoder {config.text.num_layers} layers x {config.text.hidden_size}, vocab '
        f'{config.text.vocab_size}; {config.num_image_tokens} image tokens; prompt {args.prompt_len}, '
        f'{args.new_tokens} new tokens; jax {jax.__version__} on {jax.devices()[0].platform}', flush=True)
  hf = None
  if not args.skip_hf:
    import torch
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    print(f'transformers on torch {torch.__version__} CPU, {torch.get_num_threads()} threads', flush=True)
    hf = load_hf(config, params_np)

  rows = []
  for batch in (int(b) for b in args.batches.split(',')):
    ids, mask, pixels = make_inputs(config, batch, args.prompt_len)
    tp, td, ours = bench_ours(model, params, ids, mask, pixels, args.new_tokens, args.repeats)
    row = [batch, batch * args.prompt_len / tp, batch * (args.new_tokens - 1) / td]
    if hf is not None:
      hp, hd, theirs = bench_hf(hf, ids, mask, pixels, args.new_tokens, args.repeats)
      row += [batch * args.prompt_len / hp, batch * (args.new_tokens - 1) / hd, leading_agreement(ours, theirs)]
    rows.append(row)
    print(f'  batch {batch} done', flush=True)

  print()
  head = '| batch | ours prefill tok/s | ours decode tok/s |'
  if hf is not None:
    head += ' HF prefill tok/s | HF decode tok/s | decode speed-up | greedy tokens equal to HF (of %d) |' % (
        args.new_tokens)
  print(head)
  print('|' + '---|' * (head.count('|') - 1))
  for r in rows:
    line = f'| {r[0]} | {r[1]:,.0f} | {r[2]:,.0f} |'
    if hf is not None:
      line += f' {r[3]:,.0f} | {r[4]:,.0f} | {r[2] / r[4]:.1f}x | {r[5]:.1f} |'
    print(line)

  # Cached vs recomputing the whole prefix, batch 1.
  n = args.uncached_new_tokens
  ids, mask, pixels = make_inputs(config, 1, args.prompt_len)
  sampler = generate.Sampler(model, params)

  def cached():
    return sampler(ids, mask, pixels, max_new_tokens=n).tokens

  def uncached():
    return generate.generate_uncached(model, params, ids, mask, pixels, max_new_tokens=n)

  same = bool((cached() == uncached()).all())  # also compiles both
  t_cached, t_uncached = best_time(cached, args.repeats), best_time(uncached, args.repeats)
  print(f'\n{n} new tokens, batch 1, prompt {args.prompt_len}:')
  print('| | KV cache s | recompute prefix s | ratio |')
  print('|---|---|---|---|')
  print(f'| ours (jit) | {t_cached:.3f} | {t_uncached:.3f} | {t_uncached / t_cached:.1f}x |')
  if hf is not None:
    hp, hd, _ = bench_hf(hf, ids, mask, pixels, n, args.repeats)
    hp_u, hd_u, _ = bench_hf(hf, ids, mask, pixels, n, args.repeats, use_cache=False)
    print(f'| HF generate | {hp + hd:.3f} | {hp_u + hd_u:.3f} | {(hp_u + hd_u) / (hp + hd):.1f}x |')
  print(f'cached and recomputed greedy tokens identical: {same}')


if __name__ == '__main__':
  main()
