"""Serve a LLaVA model over the OpenAI Chat Completions API (and a web chat with --web).

  python -m llava_jax.serve --checkpoint runs/s2/model [--port 8000] [--web]

`--checkpoint` is an exported llava_jax model dir or an HF LLaVA dir; its template and image aspect are used.
The served model id is the checkpoint folder's name unless --model-name is given. Endpoints: GET /health (200
once the model is loaded and compiled), GET /v1/models, POST /v1/chat/completions, and /web with --web.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading


def parse_args(argv=None):
  parser = argparse.ArgumentParser(prog='python -m llava_jax.serve', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='exported llava_jax model dir or HF LLaVA dir')
  parser.add_argument('--adapter', help='PEFT LoRA adapter dir (export.peft_dir) for the checkpoint as base; merged '
                                        'in at load')
  parser.add_argument('--host', default='127.0.0.1', help='bind address (default 127.0.0.1: this machine only)')
  parser.add_argument('--port', type=int, default=8000)
  parser.add_argument('--model-name', help="served model id (default: the checkpoint folder's name)")
  parser.add_argument('--max-batch-size', type=int, default=8, help='decode slots shared by concurrent requests')
  parser.add_argument('--max-new-tokens', type=int, default=512,
                      help='default and largest max_tokens of a request')
  parser.add_argument('--api-key-env', metavar='VAR',
                      help='require "Authorization: Bearer $VAR" on /v1 (and the key as password on /web)')
  parser.add_argument('--image-dir', help='file:// image URLs may name files inside this directory (else off)')
  parser.add_argument('--web', action='store_true', help='also serve the Gradio chat at /web')
  parser.add_argument('--max-context', type=int,
                      help="KV-cache slots per request: prompt + answer (default: the model's max positions)")
  parser.add_argument('--prompt-buckets', help='comma-separated compiled prompt lengths (default: powers of two '
                                               'from 64 below --max-context)')
  parser.add_argument('--prefill-sizes', help='comma-separated numbers of waiting prompts prefilled together '
                                               '(default: 1 and min(8, --max-batch-size))')
  parser.add_argument('--max-queue', type=int, default=256, help='waiting requests before answering 429')
  parser.add_argument('--max-image-bytes', type=int, default=10 * 2**20)
  parser.add_argument('--max-image-pixels', type=int, default=4096 * 4096)
  parser.add_argument('--tokenizer', help='tokenizer dir, when the checkpoint has none')
  parser.add_argument('--template', help="conversation template (default: the checkpoint's, else vicuna_v1)")
  parser.add_argument('--image-aspect', choices=('square', 'pad'), help="default: the checkpoint's, else square")
  parser.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), help='param dtype to load')
  args = parser.parse_args(argv)
  for name in ('max_batch_size', 'max_new_tokens', 'max_queue', 'max_image_bytes', 'max_image_pixels'):
    if getattr(args, name) < 1:
      parser.error(f'--{name.replace("_", "-")} must be >= 1')
  if args.image_dir is not None and not os.path.isdir(args.image_dir):
    parser.error(f'--image-dir {args.image_dir}: not a directory')
  if args.api_key_env is not None and not os.environ.get(args.api_key_env):
    parser.error(f'--api-key-env {args.api_key_env}: that environment variable is empty or not set')
  for name in ('prompt_buckets', 'prefill_sizes'):
    value = getattr(args, name)
    try:
      setattr(args, name, [int(b) for b in value.split(',')] if value else None)
    except ValueError:
      parser.error(f'--{name.replace("_", "-")} {value!r}: expected comma-separated integers')
    if getattr(args, name) and min(getattr(args, name)) < 1:
      parser.error(f'--{name.replace("_", "-")} {value!r}: values must be >= 1')
  return args


def build(args, log=print):
  """(FastAPI app, Engine) from parsed flags; the engine compiles in a thread (/health answers 503 until done)."""
  from llava_jax.inference import load_inference_model
  from llava_jax.serve.app import create_app
  from llava_jax.serve.engine import Engine
  from llava_jax.serve.protocol import Limits
  log(f'loading {args.checkpoint} ...')
  im = load_inference_model(args.checkpoint, tokenizer_path=args.tokenizer, template=args.template,
                            image_aspect=args.image_aspect, dtype=args.dtype, adapter=args.adapter)
  engine = Engine(im, max_batch_size=args.max_batch_size, max_context=args.max_context, buckets=args.prompt_buckets,
                  prefill_sizes=args.prefill_sizes, max_queue=args.max_queue, log=log)
  name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
  limits = Limits(args.max_image_bytes, args.max_image_pixels, args.max_new_tokens)
  api_key = os.environ[args.api_key_env] if args.api_key_env else None
  app = create_app(engine, model_name=name, image_dir=args.image_dir, limits=limits, api_key=api_key)
  if args.web:
    from llava_jax.serve.web import mount_web
    app = mount_web(app, engine, limits=limits, api_key=api_key)
  log(f'model {name!r}: template {im.template}, image aspect {im.image_aspect}, {args.max_batch_size} slots, '
      f'context {engine.max_context}, prompt buckets {list(engine.buckets)}')
  return app, engine


def main(argv=None) -> int:
  args = parse_args(argv)
  import uvicorn
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  try:
    app, engine = build(args, log)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  threading.Thread(target=engine.start, name='compile', daemon=True).start()
  log(f'serving on http://{args.host}:{args.port} (/health is 200 once compiled)'
      + (f'; web chat at http://{args.host}:{args.port}/web' if args.web else ''))
  uvicorn.run(app, host=args.host, port=args.port, log_level='info')
  engine.shutdown()
  return 0


if __name__ == '__main__':
  sys.exit(main())
