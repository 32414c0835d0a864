"""Input pipeline throughput (examples/s) with 0, 1 and 2 worker processes at 336 px.

  python bench/data_pipeline.py [--num-examples 512] [--batch-size 16] [--workers 0 1 2]

Builds a throwaway TFDS dataset of COCO-like 640x480 JPEGs with LLaVA-Instruct-like conversations
(the demo's shapes, drawn large), then times read + JPEG decode + pad/resize/crop/normalize +
tokenize (vicuna_v1, LLaMA SentencePiece, 576 image tokens, max length 2048) + batching. Start-up
(spawning workers) is reported separately from steady-state throughput.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from llava_jax.demo import synthetic  # noqa: E402
from llava_jax.data.builder import build_dataset  # noqa: E402
from llava_jax.data.pipeline import make_pipeline  # noqa: E402
from llava_jax.data.tokenize import add_image_token  # noqa: E402


def write_dataset(root: str, n: int) -> str:
  images = os.path.join(root, 'images')
  os.makedirs(images)
  samples = []
  kinds = (synthetic.conversation_sample, synthetic.detail_sample, synthetic.reasoning_sample)
  for i in range(n):
    rng = np.random.default_rng(i)
    scene = synthetic.place(rng, synthetic.random_kinds(rng, 3), 3)
    img = synthetic.draw(scene, 480).resize((640, 480))
    noise = Image.fromarray(rng.integers(0, 40, (480, 640, 3), dtype=np.uint8)).filter(ImageFilter.BoxBlur(2))
    img = Image.blend(img, noise, 0.3)  # texture, so JPEG decoding costs what a photo costs
    img.save(os.path.join(images, f'{i:06d}.jpg'), quality=90)
    samples.append(dict(id=str(i), image=f'{i:06d}.jpg', conversations=kinds[i % 3](scene, rng)))
  with open(os.path.join(root, 'data.json'), 'w') as f:
    json.dump(samples, f)
  return build_dataset({'train': os.path.join(root, 'data.json')}, images, os.path.join(root, 'tfds'),
                       name='bench', progress_every=0)['data_dir']


def load_tokenizer(root: str):
  try:
    import mistral_common
    from transformers import LlamaTokenizer
    d = os.path.join(root, 'spm')
    os.makedirs(d)
    shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), 'data', 'tokenizer.model.v1'),
                os.path.join(d, 'tokenizer.model'))
    tok, name = LlamaTokenizer.from_pretrained(d, legacy=False), 'LLaMA SentencePiece (32000)'
  except ImportError:
    tok, name = synthetic.build_demo_tokenizer(os.path.join(root, 'demo_tok')), 'demo byte-level BPE'
  add_image_token(tok)
  return tok, name


def run(data_dir, tokenizer, workers, args) -> dict:
  t0 = time.perf_counter()
  it = make_pipeline(data_dir, split='train', tokenizer=tokenizer, template='vicuna_v1', num_image_tokens=576,
                     image_size=args.image_size, image_aspect='pad', max_length=2048,
                     global_batch_size=args.batch_size, seed=0, num_epochs=None, worker_count=workers,
                     process_index=0, process_count=1, read_threads=args.read_threads)
  next(it)
  t1 = time.perf_counter()
  steps = args.num_examples // args.batch_size
  for _ in range(steps):
    next(it)
  t2 = time.perf_counter()
  stats = it.stats()
  it.close()
  return dict(workers=workers, startup_s=t1 - t0, examples_per_s=steps * args.batch_size / (t2 - t1),
              pad_fraction=stats['pad_fraction'])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--num-examples', type=int, default=512, help='timed examples per setting (after the first batch)')
  p.add_argument('--dataset-size', type=int, default=192, help='distinct records (epochs repeat)')
  p.add_argument('--batch-size', type=int, default=16)
  p.add_argument('--image-size', type=int, default=336)
  p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--read-threads', type=int, default=2, help='threads per process (main or worker)')
  args = p.parse_args()
  root = tempfile.mkdtemp(prefix='bench_data_')
  try:
    print(f'building {args.dataset_size} records of 640x480 JPEG ...', flush=True)
    data_dir = write_dataset(root, args.dataset_size)
    tokenizer, tok_name = load_tokenizer(root)
    print(f'tokenizer: {tok_name}; image {args.image_size}px pad; vicuna_v1; 576 image tokens; max length 2048; '
          f'batch {args.batch_size}; read threads {args.read_threads}; cpus {os.cpu_count()}')
    rows = [run(data_dir, tokenizer, w, args) for w in args.workers]
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f'\n| workers | examples/s | start-up s | pad fraction |\n|---|---|---|---|')
  for r in rows:
    print(f'| {r["workers"]} | {r["examples_per_s"]:.1f} | {r["startup_s"]:.1f} | {r["pad_fraction"]:.3f} |')


if __name__ == '__main__':
  main()
