"""Peak host memory of importing an HF checkpoint, against the checkpoint's size.

    python bench/convert_memory.py                 # ~1.1B-param LLaMA (TinyLlama shape) + small CLIP, bf16
    python bench/convert_memory.py --layers 4      # quicker, smaller

Writes a random HF LLaVA checkpoint (hub layout, sharded safetensors, bf16) tensor by tensor, then runs each step
in a fresh interpreter which first imports jax, transformers and llava_jax, notes its RSS, runs the step and
reports its peak RSS (ru_maxrss):
  load_hf_llava (bf16)   params kept in the checkpoint dtype
  load_hf_llava (fp32)   params upcast while converting (2x the checkpoint)
  import-hf CLI          load + orbax save of the exported-model dir
  export-hf CLI          orbax restore + safetensors write
  export-hf, library writer   the same with `safetensors.numpy.save_file` per shard (why we keep our writer)
One host copy of the params means (peak - RSS after imports) / params ~ 1 (plus the largest single tensor).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llava_jax.convert import layout  # noqa: E402
from llava_jax.convert.hf_config import llava_to_hf  # noqa: E402
from llava_jax.convert.safetensors_io import TensorOut, write_safetensors  # noqa: E402
from llava_jax.models.config import LlamaConfig, LlavaConfig, VisionConfig  # noqa: E402
from llava_jax.models.llava import abstract_params  # noqa: E402

GB = 1e9


def bench_config(layers: int) -> LlavaConfig:
  text = LlamaConfig(vocab_size=32064, hidden_size=2048, intermediate_size=5632, num_layers=layers, num_heads=32,
                     num_kv_heads=4, rms_norm_eps=1e-5, max_position_embeddings=2048)
  vision = VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, patch_size=14,
                        image_size=224)
  return LlavaConfig(vision=vision, text=text, projector='mlp2x_gelu', image_token_id=32000, param_dtype='bfloat16')


def write_checkpoint(path: str, config: LlavaConfig, shard_gb: float) -> int:
  """Random bf16 weights under the hub-layout names, generated one tensor at a time. Returns bytes written."""
  import ml_dtypes
  shapes = layout.leaf_shapes(abstract_params(config))
  entries = (layout.vision_entries(config.vision, shapes) + layout.projector_entries(config, shapes) +
             layout.text_entries(config.text, shapes))
  rng = np.random.default_rng(0)

  def produce(shape):
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

  tensors = [TensorOut(e.hf, e.hf_shape, np.dtype(ml_dtypes.bfloat16), lambda s=e.hf_shape: produce(s))
             for e in entries]
  write_safetensors(path, tensors, int(shard_gb * 2**30), log=lambda s: print(f'  {s}', flush=True))
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(llava_to_hf(config, 'bfloat16'), f, indent=2)
  return sum(math.prod(t.shape) * 2 for t in tensors)


# Each step runs in a fresh interpreter: imports first, RSS noted, then the step, then its peak RSS (ru_maxrss).
PRELUDE = """
import json, resource, sys, psutil, jax, torch, transformers, llava_jax.convert, llava_jax.model_dir
transformers.LlavaConfig, transformers.AutoTokenizer  # resolve the lazy imports (they pull in torch)
jax.devices()
before = psutil.Process().memory_info().rss
{step}
json.dump({{'before': before, 'peak': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}, sys.stdout)
"""


# `safetensors.numpy.save_file` takes a whole shard as arrays, so every tensor of the shard is produced first.
LIBRARY_WRITER = """
import numpy as np, safetensors.numpy
from llava_jax.convert import safetensors_io
def write_one(path, tensors, metadata):
  safetensors.numpy.save_file({t.name: np.ascontiguousarray(t.produce(), t.dtype) for t in tensors}, path, metadata)
safetensors_io._write_one = write_one
"""


def measure(step: str) -> tuple[int, int, float]:
  """-> (RSS after imports, peak RSS, wall seconds) of `step` run after the imports in a fresh process."""
  t0 = time.time()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
  proc = subprocess.run([sys.executable, '-c', PRELUDE.format(step=step)], capture_output=True, text=True, env=env)
  if proc.returncode:
    raise RuntimeError(f'step failed ({proc.returncode}):\n{step}\n{proc.stderr[-3000:]}')
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  return out['before'], out['peak'], time.time() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--layers', type=int, default=22, help='LLaMA layers (22: ~1.1B params, TinyLlama shape)')
  parser.add_argument('--dir', help='work dir (default: a temp dir, removed afterwards)')
  parser.add_argument('--shard-gb', type=float, default=1.0, help='safetensors shard size of the generated checkpoint')
  parser.add_argument('--skip-cli', action='store_true', help='only the load_hf_llava steps')
  args = parser.parse_args()
  work = args.dir or tempfile.mkdtemp(prefix='convert_bench_')
  src, out, hf_out = (os.path.join(work, d) for d in ('hf_src', 'ours', 'hf_out'))
  config = bench_config(args.layers)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))
  print(f'generating a random {n_params / 1e9:.2f}B-param HF LLaVA (bf16) in {src}', flush=True)
  t0 = time.time()
  ckpt_bytes = write_checkpoint(src, config, args.shard_gb)
  print(f'  {ckpt_bytes / GB:.2f} GB in {time.time() - t0:.0f}s', flush=True)

  load = 'llava_jax.convert.load_hf_llava({!r}, dtype={!r})'
  cli = 'from llava_jax.convert.__main__ import main; main({!r})'
  steps = [('load_hf_llava (bf16)', load.format(src, None), ckpt_bytes),
           ('load_hf_llava (fp32)', load.format(src, 'float32'), 2 * ckpt_bytes)]
  if not args.skip_cli:
    steps += [('import-hf CLI (load + orbax save)', cli.format(['import-hf', src, out]), ckpt_bytes),
              ('export-hf CLI (orbax restore + safetensors)', cli.format(['export-hf', out, hf_out]), ckpt_bytes),
              ('export-hf, library writer (save_file per shard)',
               LIBRARY_WRITER + cli.format(['export-hf', out, hf_out + '_lib']), ckpt_bytes)]
  rows = []
  for name, step, params_bytes in steps:
    print(f'running {name} ...', flush=True)
    rows.append((name, params_bytes) + measure(step))
  print(f'\ncheckpoint: {n_params / 1e9:.2f}B params, {ckpt_bytes / GB:.2f} GB bf16 safetensors '
        f'({len([f for f in os.listdir(src) if f.endswith(".safetensors")])} shards)')
  print('| step | params in RAM (GB) | RSS after imports (GB) | peak RSS (GB) | peak - imports (GB) | '
        '(peak - imports) / params | time (s) |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  for name, params_bytes, before, peak, secs in rows:
    print(f'| {name} | {params_bytes / GB:.2f} | {before / GB:.2f} | {peak / GB:.2f} | {(peak - before) / GB:.2f} | '
          f'{(peak - before) / params_bytes:.2f} | {secs:.1f} |')
  if not args.dir:
    shutil.rmtree(work)


if __name__ == '__main__':
  main()
