"""python -m llava_jax.convert {import-hf,export-hf} SRC OUT | {apply-delta,make-delta} --base DIR ... OUT

import-hf: an HF LLaVA dir (transformers 4.x or 5.x layout) or an original-release LLaVA (with --vision-tower /
           --mm-projector) -> our exported-model dir (model_config.json + orbax params/ + tokenizer/).
export-hf: our exported-model dir -> an HF LlavaForConditionalGeneration dir (hub layout, safetensors).
apply-delta: --base LLAMA_DIR --delta DELTA_DIR OUT: the original release's delta weights -> the full checkpoint.
make-delta: --base LLAMA_DIR --target LLAVA_DIR OUT: the delta of a checkpoint against its base.
"""
from __future__ import annotations

import argparse
import sys
import time

_T0 = time.time()


def log(msg: str) -> None:
  print(f'[{time.time() - _T0:7.1f}s] {msg}', file=sys.stderr, flush=True)


def _tokenizer_for(args, config, original: bool):
  """The tokenizer to store, checked against the model (<image> added for an original release), or None."""
  from llava_jax import model_dir
  from llava_jax.data.tokenize import ImageTokens
  image_token = ImageTokens.of(config).token  # <image>, or <im_patch> (mm_use_im_patch_token)
  tokenizer = None if args.no_tokenizer else model_dir.load_tokenizer(args.tokenizer or args.src)
  if tokenizer is None:
    log('no tokenizer found beside the weights (pass --tokenizer DIR to store one)')
    return None
  missing = 'add' if original else 'error'
  if not original and image_token not in tokenizer.get_added_vocab():
    log(f'warning: the tokenizer has no {image_token!r} token; the model uses id {config.image_token_id}')
    missing = 'ignore'
  try:
    model_dir.check_tokenizer(tokenizer, config, args.tokenizer or args.src, missing_image_token=missing)
  except model_dir.TokenizerMismatch as e:
    got = tokenizer.get_added_vocab().get(image_token, config.image_token_id)
    hint = f'; pass --image-token-id {got}' if got != config.image_token_id else ''
    raise SystemExit(f'error: {e}{hint}') from None
  return tokenizer


def import_hf(args) -> None:
  from llava_jax.convert.hf_config import original_projector, read_json
  from llava_jax.convert.hf_to_flax import load_hf_llava
  from llava_jax.model_dir import save_model
  log(f'reading {args.src}')
  model, params = load_hf_llava(args.src, dtype=args.dtype, vision_tower=args.vision_tower,
                                mm_projector=args.mm_projector, image_token_id=args.image_token_id, log=log)
  config = model.config
  raw = read_json(args.src)
  original = bool(args.vision_tower or args.mm_projector or
                  ('text_config' not in raw and original_projector(raw) is not None))
  tokenizer = _tokenizer_for(args, config, original)
  n = sum(x.size for x in _leaves(params))
  log(f'writing {n / 1e6:.1f}M params ({config.param_dtype}) to {args.out}')
  # Orbax deep-copies numpy leaves before its async write by default: a second host copy of a 7B model. Nothing
  # else touches these arrays while it writes, so save them in place.
  import numpy as np
  import orbax.checkpoint as ocp
  ocp.type_handlers.register_type_handler(np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False),
                                          override=True)
  save_model(args.out, config, params, tokenizer=tokenizer, template=args.template)
  log(f'done: {args.out}')


def _leaves(tree):
  for v in tree.values():
    yield from (_leaves(v) if isinstance(v, dict) else [v])


def export_hf(args) -> None:
  from llava_jax import model_dir
  from llava_jax.convert.flax_to_hf import export_hf_llava
  log(f'reading {args.src}')
  if not model_dir.is_model_dir(args.src):
    raise SystemExit(f'error: {args.src} is not an exported llava_jax model dir (model_config.json + params/)')
  try:
    m = model_dir.load_model(args.src, tokenizer_path=args.tokenizer)
  except (FileNotFoundError, model_dir.TokenizerMismatch) as e:
    raise SystemExit(f'error: {e}') from None
  export_hf_llava(args.out, m.config, m.params, tokenizer=m.tokenizer, dtype=args.dtype,
                  max_shard_bytes=int(args.max_shard_gb * 2**30), log=log)
  log(f'done: {args.out}')


def delta(args) -> None:
  from llava_jax.convert import delta as delta_lib
  shard = int(args.max_shard_gb * 2**30)
  try:
    if args.command == 'apply-delta':
      log(f'applying delta {args.delta} to base {args.base}')
      delta_lib.apply_delta(args.base, args.delta, args.out, dtype=args.dtype, max_shard_bytes=shard, log=log)
    else:
      log(f'delta of target {args.target} against base {args.base}')
      stats = delta_lib.make_delta(args.base, args.target, args.out, dtype=args.dtype, max_shard_bytes=shard, log=log)
      if stats['not_bitwise']:
        raise SystemExit(f'error: the delta in {args.dtype} does not give the target back bit for bit in '
                         f'{len(stats["not_bitwise"])} tensors; use --dtype float32')
  except (delta_lib.DeltaMismatchError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  log(f'done: {args.out}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m llava_jax.convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import-hf', help='HF / original-release LLaVA -> exported-model dir')
  imp.add_argument('src', help='HF LLaVA dir, or the LLaMA dir of an original-release LLaVA')
  imp.add_argument('out', help='output exported-model dir')
  imp.add_argument('--vision-tower', help='CLIP checkpoint dir (original release; default: mm_vision_tower)')
  imp.add_argument('--mm-projector', help='mm_projector.bin / .safetensors (original release, stage-1 output)')
  imp.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), help='param dtype (default: the '
                   "checkpoint's)")
  imp.add_argument('--image-token-id', type=int, help="image token id (original release; default: old vocab size)")
  imp.add_argument('--tokenizer', help='tokenizer dir (default: SRC)')
  imp.add_argument('--no-tokenizer', action='store_true', help='do not store a tokenizer')
  imp.add_argument('--template', help='conversation template name stored with the model (e.g. llava_v1)')
  imp.set_defaults(fn=import_hf)
  exp = sub.add_parser('export-hf', help='exported-model dir -> HF LlavaForConditionalGeneration dir')
  exp.add_argument('src', help='exported-model dir (model_config.json + params/)')
  exp.add_argument('out', help='output HF dir')
  exp.add_argument('--tokenizer', help='tokenizer dir to write beside the weights (default: SRC/tokenizer)')
  exp.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), help='dtype of the written weights')
  exp.add_argument('--max-shard-gb', type=float, default=5.0, help='safetensors shard size (GiB)')
  exp.set_defaults(fn=export_hf)
  for name, other, default, text in (
      ('apply-delta', 'delta', None, 'OUT = base + delta (the original release\'s apply_delta)'),
      ('make-delta', 'target', 'float32', 'OUT = target - base (the original release\'s make_delta)')):
    d = sub.add_parser(name, help=text, description=text)
    d.add_argument('--base', required=True, help='base LLM dir (HF LlamaForCausalLM, e.g. LLaMA-7B)')
    d.add_argument(f'--{other}', required=True, help=f'{other} dir (HF checkpoint: safetensors or .bin)')
    d.add_argument('out', help='output dir (safetensors + the other files of the ' + other + ' dir)')
    d.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), default=default,
                   help='dtype of the written tensors (default: ' + (default or "the base's") + ')')
    d.add_argument('--max-shard-gb', type=float, default=5.0, help='safetensors shard size (GiB)')
    d.set_defaults(fn=delta)
  args = parser.parse_args(argv)
  args.fn(args)


if __name__ == '__main__':
  main()
