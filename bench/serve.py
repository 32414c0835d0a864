"""Serving throughput: the OpenAI-compatible server (continuous batching) at concurrency 1, 8 and 32, against a
loop of transformers `generate` calls at batch 1 (how the original LLaVA worker serves), same model and prompts.

  python bench/serve.py                        # preset 'small' (bench/generate.py), 32 new tokens per request
  python bench/serve.py --concurrency 1,8,32 --new-tokens 64 --requests 2 --profile /tmp/serve_prof

Each level sends max(4, --requests x concurrency) streamed requests (an image + a 40-word question, greedy, exactly
--new-tokens tokens: EOS is never drawn by this random model... and if it is, tokens/s counts what came back)
from that many client threads through the official `openai` client. Columns: requests/s and generated tokens/s
over the level's wall time, and generated tokens per CPU second of this process (server, engine and client
threads; the figure least moved by other load on a shared machine); time to first token (first content chunk)
p50; request latency p50 / p99. The engine columns say where the time went: decode steps and the rows busy per
step, prompts per prefill, and the share of
the wall time the engine thread spent waiting for the device (`wait`) and in its own host work (`host`:
detokenizing, stop strings, queueing events). `--profile DIR` writes a jax profiler trace of the highest level.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import importlib.util
import io
import os
import resource
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
_spec = importlib.util.spec_from_file_location('bench_generate', os.path.join(ROOT, 'bench', 'generate.py'))
bench_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_generate)  # its model presets, random weights and transformers loader


def word_tokenizer(vocab_size: int, image_token_id: int):
  """A word-level tokenizer 'w<i>' (unk, bos, eos, pad first) whose `<image>` is `image_token_id`."""
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers
  from llava_jax.data.tokenize import add_image_token
  specials = ['<unk>', '<s>', '</s>', '<pad>']
  vocab = {w: i for i, w in enumerate(specials + [f'w{i}' for i in range(image_token_id - len(specials))])}
  tk = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token='<s>', eos_token='</s>',
                                             unk_token='<unk>', pad_token='<pad>')
  add_image_token(tok)
  assert tok.convert_tokens_to_ids('<image>') == image_token_id and len(tok) <= vocab_size
  return tok


def make_requests(n: int, seed: int = 0):
  """n (question, png bytes): 40 random words and one of 4 random images."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  images = []
  for i in range(4):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, 'PNG')
    images.append(buf.getvalue())
  return [(' '.join(f'w{w}' for w in rng.integers(10, 30000, 40)), images[i % 4]) for i in range(n)]


def one_request(client, question, png, new_tokens):
  """-> (latency s, time to first token s, completion tokens) of one streamed request."""
  url = 'data:image/png;base64,' + base64.b64encode(png).decode()
  t0 = time.perf_counter()
  first, tokens = None, 0
  for chunk in client.chat.completions.create(
      model='model', temperature=0, max_tokens=new_tokens, stream=True, stream_options={'include_usage': True},
      messages=[{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': url}},
                                             {'type': 'text', 'text': question}]}]):
    if chunk.choices and chunk.choices[0].delta.content and first is None:
      first = time.perf_counter() - t0
    if chunk.usage:
      tokens = chunk.usage.completion_tokens
  return time.perf_counter() - t0, first if first is not None else float('nan'), tokens


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def run_level(client, engine, concurrency, requests, new_tokens):
  before = dict(engine.stats)
  t0, c0 = time.perf_counter(), cpu_seconds()
  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    results = list(pool.map(lambda r: one_request(client, r[0], r[1], new_tokens), requests))
  wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
  d = {k: engine.stats[k] - before.get(k, 0) for k in engine.stats}
  lat = np.array([r[0] for r in results])
  return {'conc': concurrency, 'n': len(requests), 'wall': wall, 'rps': len(requests) / wall,
          'tps': sum(r[2] for r in results) / wall, 'tpc': sum(r[2] for r in results) / cpu,
          'ttft': float(np.nanmedian([r[1] for r in results])),
          'p50': float(np.percentile(lat, 50)), 'p99': float(np.percentile(lat, 99)),
          'steps': d.get('steps', 0), 'rows': d.get('row_steps', 0) / max(d.get('steps', 0), 1),
          'per_prefill': d.get('prefill_rows', 0) / max(d.get('prefills', 0), 1),
          'wait': d.get('wait_s', 0) / wall, 'host': d.get('host_s', 0) / wall,
          'dispatch': d.get('dispatch_s', 0) / wall, 'step_ms': 1000 * d.get('wait_s', 0) / max(d.get('steps', 0), 1)}


def time_programs(engine, repeats: int = 3):
  """(program, wall ms, CPU ms) of each compiled program, the best of `repeats`, with the engine idle."""
  out = []
  with engine.lock:  # the loop waits; nothing is in flight
    progs = [(f'decode step, {n} of {engine.batch} rows', lambda n=n: engine.run_idle_step(n))
             for n in engine.step_sizes]
    progs += [(f'prefill, {n} prompts x {p} tokens', lambda n=n, p=p: engine.run_idle_prefill(n, p))
              for p in engine.buckets for n in engine.prefill_sizes]
    for name, fn in progs:
      best = (float('inf'), float('inf'))
      for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        fn()
        best = min(best, (1000 * (time.perf_counter() - t0), 1000 * (cpu_seconds() - c0)))
      out.append((name, *best))
  return out


def bench_hf(config, params, im, requests, new_tokens):
  """transformers generate at batch 1 in a loop (the original worker's way): -> (tokens/s, latency p50,
  tokens per CPU second)."""
  import torch
  from llava_jax import inference
  from llava_jax.data import image as image_lib
  from PIL import Image
  hf = bench_generate.load_hf(config, params)
  lat, tokens, cpu = [], 0, 0.0
  for i, (question, png) in enumerate([requests[0]] + list(requests)):  # the first one warms up
    ids = inference.prompt_ids(im, [{'from': 'human', 'value': '<image>\n' + question}])
    pixels = image_lib.preprocess_image(Image.open(io.BytesIO(png)).convert('RGB'), config.vision.image_size,
                                        im.image_aspect)
    t0, c0 = time.perf_counter(), cpu_seconds()
    with torch.no_grad():
      out = hf.generate(input_ids=torch.from_numpy(ids[None]).long(), attention_mask=torch.ones(1, len(ids)).long(),
                        pixel_values=torch.from_numpy(pixels[None]).permute(0, 3, 1, 2).contiguous(),
                        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if i:
      lat.append(time.perf_counter() - t0)
      cpu += cpu_seconds() - c0
      tokens += out.shape[1] - len(ids)
  return tokens / sum(lat), float(np.median(lat)), tokens / cpu


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', choices=sorted(bench_generate.CONFIGS), default='small')
  parser.add_argument('--concurrency', default='1,8,32')
  parser.add_argument('--new-tokens', type=int, default=32)
  parser.add_argument('--requests', type=int, default=1, help='requests per client thread at each level')
  parser.add_argument('--max-batch-size', type=int, default=32)
  parser.add_argument('--max-context', type=int, default=256)
  parser.add_argument('--prompt-buckets', default='128', help='compiled prompt lengths (the prompts are ~95 tokens)')
  parser.add_argument('--hf-requests', type=int, default=4, help='requests in the transformers loop (0: skip)')
  parser.add_argument('--profile', help='write a jax profiler trace of the highest concurrency here')
  args = parser.parse_args(argv)
  levels = [int(c) for c in args.concurrency.split(',')]

  import jax
  import openai
  from llava_jax import model_dir
  from llava_jax.serve import __main__ as serve_main
  from llava_jax.serve.app import serve_in_thread
  config = bench_generate.CONFIGS[args.config]()
  params = bench_generate.random_params(config)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, 'model')
    model_dir.save_model(path, config, params, tokenizer=word_tokenizer(config.text.vocab_size,
                                                                         config.image_token_id),
                         template='vicuna_v1')
    app, engine = serve_main.build(serve_main.parse_args([
        '--checkpoint', path, '--max-batch-size', str(args.max_batch_size), '--max-context', str(args.max_context),
        '--max-new-tokens', str(args.new_tokens), '--prompt-buckets', args.prompt_buckets]),
        log=lambda m: print(m, flush=True))
  t0 = time.perf_counter()
  engine.start()
  print(f'compiled in {time.perf_counter() - t0:.1f}s; decoder {config.text.num_layers} x {config.text.hidden_size}, '
        f'vocab {config.text.vocab_size}; jax {jax.__version__} on {jax.devices()[0].platform}', flush=True)
  server, url = serve_in_thread(app)
  client = openai.OpenAI(base_url=url + '/v1', api_key='unused', max_retries=0, timeout=600)
  count = lambda c: max(4, args.requests * c)
  requests = make_requests(max(count(c) for c in levels))
  run_level(client, engine, 2, requests[:2], args.new_tokens)  # warm-up
  rows = []
  for c in levels:
    reqs = requests[:count(c)]
    if args.profile and c == max(levels):
      with jax.profiler.trace(args.profile):
        rows.append(run_level(client, engine, c, reqs, args.new_tokens))
    else:
      rows.append(run_level(client, engine, c, reqs, args.new_tokens))
    print(f'  concurrency {c} done ({rows[-1]["wall"]:.1f}s)', flush=True)
  server.should_exit = True
  programs = time_programs(engine)
  hf = None
  if args.hf_requests:
    import torch
    print(f'transformers generate loop, torch {torch.__version__}, {torch.get_num_threads()} threads', flush=True)
    hf = bench_hf(config, params, engine.im, requests[:args.hf_requests], args.new_tokens)
  engine.shutdown()

  print()
  print('| concurrency | requests | req/s | gen tok/s | gen tok / CPU s | tok/s vs conc 1 | TTFT p50 s | latency p50 s '
        '| p99 s | decode steps | rows/step | prompts/prefill | ms per step (wait) | engine wait | engine host |')
  print('|' + '---|' * 15)
  base = rows[0]['tps']
  for r in rows:
    print(f'| {r["conc"]} | {r["n"]} | {r["rps"]:.2f} | {r["tps"]:.1f} | {r["tpc"]:.1f} | {r["tps"] / base:.1f}x | '
          f'{r["ttft"]:.2f} | {r["p50"]:.2f} | {r["p99"]:.2f} | {r["steps"]} | {r["rows"]:.1f} | '
          f'{r["per_prefill"]:.1f} | {r["step_ms"]:.0f} | {100 * r["wait"]:.0f}% | {100 * r["host"]:.0f}% |')
  if hf is not None:
    print(f'| transformers generate, batch-1 loop | {args.hf_requests} | {1 / hf[1]:.2f} | {hf[0]:.1f} | '
          f'{hf[2]:.1f} | {hf[0] / base:.1f}x | | {hf[1]:.2f} | | | | | | | |')


  print('\nWhere the time goes: each compiled program alone (best of 3, engine idle)')
  print('| program | wall ms | CPU ms |')
  print('|---|---|---|')
  for name, wall, cpu in programs:
    print(f'| {name} | {wall:.0f} | {cpu:.0f} |')


if __name__ == '__main__':
  main()
