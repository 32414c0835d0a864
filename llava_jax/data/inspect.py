"""Show exactly what a model is trained on: token ids and labels per sample, before a long run.

  python -m llava_jax.data.inspect --data stage2.json --tokenizer TOKENIZER_DIR --template vicuna_v1 \\
      --num-image-tokens 576 --limit 3 --pretty

One JSON line per sample: {"id", "num_images", "input_ids", "labels"} (labels -100 where not supervised).
With --pretty, each is followed by its tokens with the supervised ones highlighted (green, or [[...]]
when the output is not a terminal) and each image's run of image tokens shown as <image>xN (several
images: several runs, in the order of "image": [...]). A sample whose <image> count differs from its
images is reported and skipped, as the build skips it.
"""
from __future__ import annotations

import argparse
import json
import sys

from llava_jax.data.builder import SkipRecord, image_paths, read_entries
from llava_jax.data.conversation import TEMPLATES
from llava_jax.data.tokenize import IGNORE_INDEX, add_image_token, check_template_tokens, tokenize_conversation


def token_texts(ids, tokenizer) -> list[str]:
  """Each token's text as it appears in context (leading spaces kept): decode(prev + t) - decode(prev)."""
  out = []
  for k, t in enumerate(ids):
    prev = [int(ids[k - 1])] if k else []
    whole, head = tokenizer.decode(prev + [int(t)]), tokenizer.decode(prev)
    out.append(whole[len(head):] if whole.startswith(head) else tokenizer.convert_ids_to_tokens(int(t)))
  return out


def pretty(input_ids, labels, tokenizer, image_id: int, color: bool) -> str:
  """Tokens as text: supervised runs highlighted, image runs collapsed."""
  texts = token_texts(input_ids, tokenizer)
  out, i, n = [], 0, len(input_ids)
  while i < n:
    if input_ids[i] == image_id:
      j = i
      while j < n and input_ids[j] == image_id:
        j += 1
      out.append(f'<image>x{j - i}')
      i = j
      continue
    sup = labels[i] != IGNORE_INDEX
    j = i
    while j < n and input_ids[j] != image_id and (labels[j] != IGNORE_INDEX) == sup:
      j += 1
    text = '|'.join(repr(x)[1:-1] for x in texts[i:j])
    out.append((f'\x1b[32m{text}\x1b[0m' if color else f'[[{text}]]') if sup else text)
    i = j
  return '|'.join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m llava_jax.data.inspect', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data', required=True, help='LLaVA JSON list (or .jsonl)')
  p.add_argument('--tokenizer', required=True, help='HF tokenizer folder')
  p.add_argument('--template', required=True, choices=sorted(TEMPLATES))
  p.add_argument('--num-image-tokens', type=int, default=576, help='image tokens per image (576 at 336px)')
  p.add_argument('--max-length', type=int, default=None, help='truncate as training would')
  p.add_argument('--limit', type=int, default=None, help='first K samples only')
  p.add_argument('--pretty', action='store_true', help='also print tokens with supervised ones highlighted')
  p.add_argument('--color', choices=('auto', 'always', 'never'), default='auto')
  args = p.parse_args(argv)

  from transformers import AutoTokenizer
  try:
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    entries = read_entries(args.data)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  try:
    check_template_tokens(tokenizer, args.template, args.tokenizer, key='--template')
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  had_image = '<image>' in tokenizer.get_added_vocab()
  image_id = add_image_token(tokenizer)
  if not had_image:
    print(f'note: tokenizer had no <image> token; added it as id {image_id}', file=sys.stderr)
  color = args.color == 'always' or (args.color == 'auto' and sys.stdout.isatty())
  bad = dropped = mismatched = 0
  for index, entry in entries[:args.limit]:
    sample_id = entry.get('id', index) if isinstance(entry, dict) else index
    entry = entry if isinstance(entry, dict) else {}
    try:
      tok = tokenize_conversation(entry['conversations'], tokenizer, args.template, args.num_image_tokens,
                                  args.max_length)
      num_images = len(image_paths(entry))
    except (TypeError, KeyError, ValueError, SkipRecord) as e:
      bad += 1
      print(f'sample {sample_id!r} (#{index}): cannot tokenize: {e}', file=sys.stderr)
      continue
    if tok['num_images'] != num_images:  # the build skips it (image_token_count)
      mismatched += 1
      print(f'sample {sample_id!r} (#{index}): {tok["num_images"]} <image> placeholders for {num_images} '
            'image(s); the build skips it', file=sys.stderr)
      continue
    if tok['dropped']:
      dropped += 1
      print(f'sample {sample_id!r} (#{index}): dropped ({tok["drop_reason"]})', file=sys.stderr)
    print(json.dumps({'id': sample_id, 'num_images': num_images, 'input_ids': tok['input_ids'].tolist(),
                      'labels': tok['labels'].tolist()}))
    if args.pretty:
      print(pretty(tok['input_ids'], tok['labels'], tokenizer, image_id, color))
  if bad or dropped or mismatched:
    print(f'{bad} malformed, {mismatched} with an <image> count not matching their images, {dropped} dropped '
          'samples', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
