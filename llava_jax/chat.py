"""Chat with a LLaVA model in the terminal, streaming tokens as they are generated.

  python -m llava_jax.chat --checkpoint out/llava_tiny --image photo.jpg
  python -m llava_jax.chat --checkpoint out/llava_tiny --image a.jpg --image b.jpg    # several images

`--checkpoint` is an exported llava_jax model dir (model_config.json + params/ + tokenizer/) or an HF LLaVA
dir. The conversation keeps its history in the model's template; the images go in front of the first user
turn (`<image>` per image, in order). Commands: `/image PATH [PATH ...]` (new images, new conversation),
`/reset` (clear the history, keep the images), `/quit` (or end of input).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from llava_jax.data import conversation

HELP = 'commands: /image PATH [PATH ...], /reset, /quit'


class ChatSession:
  """The conversation state of one chat: image, turns, and how to answer the next user message."""

  def __init__(self, im, *, max_new_tokens: int, sampling, seed: int = 0, show_prompt: bool = False):
    self.im, self.max_new_tokens, self.sampling, self.seed = im, max_new_tokens, sampling, seed
    self.show_prompt = show_prompt
    self.pixels = None   # [H, W, 3] for one image, [images, H, W, 3] for several
    self.image_paths: list[str] = []
    self.turns: list[dict] = []

  def set_image(self, *paths: str) -> None:
    """Loads the images (raises FileNotFoundError / OSError naming the path) and starts a new conversation."""
    import numpy as np
    from llava_jax.inference import load_pixels
    pixels = [load_pixels(self.im, p) for p in paths]
    self.pixels = None if not pixels else pixels[0] if len(pixels) == 1 else np.stack(pixels)
    self.image_paths = list(paths)
    self.turns = []

  def reset(self) -> None:
    self.turns = []

  def ask(self, text: str, write) -> str:
    """Adds a user turn, streams the answer through write(str), records it in the history; returns it."""
    from llava_jax.inference import generate_batch, prompt_ids
    if not self.turns and self.image_paths:
      text = (conversation.IMAGE_TOKEN + '\n') * len(self.image_paths) + text
    messages = self.turns + [{'from': 'human', 'value': text}]
    ids = prompt_ids(self.im, messages)
    if self.show_prompt:
      prompt = conversation.render(messages, self.im.template, add_generation_prompt=True)
      print(f'[prompt: {len(ids)} tokens] {json.dumps(prompt)}', file=sys.stderr, flush=True)
    # Prompt lengths in steps of 128: a growing conversation recompiles every 128 tokens, not every turn.
    out = generate_batch(self.im, [ids], [self.pixels], max_new_tokens=self.max_new_tokens,
                         sampling=self.sampling, seed=self.seed + len(self.turns),
                         stream=lambda i, delta: write(delta), pad_multiple=128)
    answer = out.texts[0].strip()
    self.turns = messages + [{'from': 'gpt', 'value': answer}]
    return answer


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m llava_jax.chat', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='exported llava_jax model dir or HF LLaVA dir')
  parser.add_argument('--image', action='append', default=[],
                      help='image to talk about (optional; repeat for several; /image PATH changes them)')
  parser.add_argument('--tokenizer', help='tokenizer dir, when the checkpoint has none')
  parser.add_argument('--adapter', help='PEFT LoRA adapter dir (export.peft_dir) for the checkpoint as base; merged '
                                        'in at load')
  parser.add_argument('--template', help="conversation template (default: the checkpoint's, else vicuna_v1); "
                                         f'one of {sorted(conversation.TEMPLATES)}')
  parser.add_argument('--image-aspect', choices=('square', 'pad'),
                      help="image preprocessing (default: the checkpoint's, else square; LLaVA-1.5 uses pad)")
  parser.add_argument('--temperature', type=float, default=0.2, help='0 = greedy (default 0.2, as the original)')
  parser.add_argument('--top-p', type=float, default=1.0)
  parser.add_argument('--top-k', type=int, default=0)
  parser.add_argument('--max-new-tokens', type=int, default=512)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), help='param dtype to load')
  parser.add_argument('--show-prompt', action='store_true', help='print each rendered prompt to stderr')
  args = parser.parse_args(argv)

  for path in args.image:  # before the slow imports and model load
    if not os.path.isfile(path):
      print(f'error: image not found: {path}', file=sys.stderr)
      return 2
  from llava_jax.inference import load_inference_model
  from llava_jax.generate import SamplingParams
  try:
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k)
    print(f'loading {args.checkpoint} ...', file=sys.stderr, flush=True)
    im = load_inference_model(args.checkpoint, tokenizer_path=args.tokenizer, template=args.template,
                              image_aspect=args.image_aspect, dtype=args.dtype, adapter=args.adapter)
    session = ChatSession(im, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                          show_prompt=args.show_prompt)
    if args.image:
      session.set_image(*args.image)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'template {im.template}, image {", ".join(args.image) or "none"}. {HELP}', file=sys.stderr, flush=True)

  def write(text):
    sys.stdout.write(text)
    sys.stdout.flush()

  user, assistant = conversation.get_template(im.template).roles
  while True:
    write(f'{user}: ')
    line = sys.stdin.readline()
    if not line:  # end of input
      write('\n')
      return 0
    line = line.strip()
    if not line:
      continue
    if line.startswith('/'):
      command, _, arg = line.partition(' ')
      if command == '/quit':
        return 0
      if command == '/reset':
        session.reset()
        print('[conversation reset]', flush=True)
      elif command == '/image':
        try:
          session.set_image(*arg.split())
          print(f'[image {arg.strip()} loaded; new conversation]', flush=True)
        except (OSError, ValueError) as e:
          print(f'[error: {e}; keeping the previous image]', flush=True)
      else:
        print(f'[unknown command {command}; {HELP}]', flush=True)
      continue
    write(f'{assistant}: ')
    session.ask(line, write)
    write('\n')


if __name__ == '__main__':
  sys.exit(main())
