"""`python -m llava_jax.datagen pretrain`: image-caption pairs -> stage-1 (feature alignment) samples.

Each pair becomes a single-turn LLaVA sample: the human asks one brief-description instruction drawn
at random (seeded per sample id) and the caption is the answer. Optionally the pairs are first
reduced by concept-balanced filtering (paper, CC3M -> 595K):
  1. extract the noun phrases of every caption (noun_phrases.py) and count, per unique phrase, the
     captions containing it;
  2. drop phrases seen in fewer than --min-freq captions (rare combinations of concept and attribute,
     usually covered by other captions);
  3. from the least frequent remaining phrase upwards, add the captions containing the phrase to the
     selection; a phrase in more than --max-per-phrase captions adds a seeded random subset of that size
     (drawn from all its captions).
Captions with no kept phrase are dropped. Output keeps the input order.
"""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import os
import random
import sys

from llava_jax.datagen import noun_phrases, prompts

FILTER_HELP = __doc__[__doc__.index('Optionally'):].strip()


@dataclasses.dataclass
class FilterStats:
  captions: int = 0
  phrases: int = 0          # unique noun phrases
  rare_phrases: int = 0     # dropped: in fewer than min_freq captions
  capped_phrases: int = 0   # in more than max_per_phrase captions: subsampled
  no_phrase: int = 0        # captions with no noun phrase at all
  selected: int = 0


def phrase_frequencies(captions: list[str]) -> tuple[list[set], collections.Counter]:
  """(noun-phrase set per caption, number of captions containing each phrase)."""
  per_caption = [set(noun_phrases.noun_phrases(c)) for c in captions]
  counts = collections.Counter(p for phrases in per_caption for p in phrases)
  return per_caption, counts


def concept_balanced_filter(captions: list[str], *, min_freq: int = 3, max_per_phrase: int = 100,
                            seed: int = 0) -> tuple[list[int], FilterStats]:
  """Indices (ascending) of the captions kept by concept-balanced filtering; see the module doc."""
  if min_freq < 1 or max_per_phrase < 1:
    raise ValueError(f'min_freq={min_freq} and max_per_phrase={max_per_phrase} must be >= 1')
  per_caption, counts = phrase_frequencies(captions)
  members = collections.defaultdict(list)
  for i, phrases in enumerate(per_caption):
    for p in phrases:
      members[p].append(i)
  stats = FilterStats(captions=len(captions), phrases=len(counts),
                      no_phrase=sum(1 for p in per_caption if not p))
  rng = random.Random(seed)
  selected = set()
  for phrase in sorted(counts, key=lambda p: (counts[p], p)):  # least frequent first
    if counts[phrase] < min_freq:
      stats.rare_phrases += 1
      continue
    indices = members[phrase]
    if len(indices) > max_per_phrase:
      stats.capped_phrases += 1
      indices = rng.sample(indices, max_per_phrase)
    selected.update(indices)
  stats.selected = len(selected)
  return sorted(selected), stats


def read_pairs(path: str, *, image_key: str = 'image', caption_key: str = 'caption',
               id_key: str = 'id') -> list[dict]:
  """TSV with a header row, a JSON list, or JSONL -> [{'id', 'image', 'caption'}] (id defaults to the image stem)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'caption pairs file not found: {path}')
  rows = []
  if path.endswith('.tsv'):
    with open(path, encoding='utf-8', newline='') as f:
      reader = csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE)
      missing = [k for k in (image_key, caption_key) if k not in (reader.fieldnames or [])]
      if missing:
        raise ValueError(f'{path}: header {reader.fieldnames} lacks column(s) {missing} '
                         '(set --image-key/--caption-key)')
      rows = [(f'row {i + 2}', r) for i, r in enumerate(reader)]
  else:
    with open(path, encoding='utf-8') as f:
      text = f.read()
    try:
      data = json.loads(text) if text.lstrip().startswith('[') else None
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None
    if data is not None:
      rows = [(f'item {i}', r) for i, r in enumerate(data)]
    else:  # JSONL
      for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
          try:
            rows.append((f'line {lineno}', json.loads(line)))
          except json.JSONDecodeError as e:
            raise ValueError(f'{path}:{lineno}: not valid JSON ({e})') from None
  pairs = []
  for where, row in rows:
    if not isinstance(row, dict) or image_key not in row or caption_key not in row:
      raise ValueError(f'{path}: {where} lacks {image_key!r} or {caption_key!r}')
    image = str(row[image_key] or '').strip()
    pair_id = row.get(id_key)
    pair_id = str(pair_id) if pair_id not in (None, '') else os.path.splitext(os.path.basename(image))[0]
    pairs.append({'id': pair_id, 'image': image, 'caption': ' '.join(str(row[caption_key] or '').split())})
  return pairs


def to_sample(pair: dict, seed: int) -> dict:
  instruction = random.Random(f'{seed}:{pair["id"]}').choice(prompts.BRIEF_INSTRUCTIONS)
  return {'id': pair['id'], 'image': pair['image'],
          'conversations': [{'from': 'human', 'value': f'<image>\n{instruction}'},
                            {'from': 'gpt', 'value': pair['caption']}]}


def add_args(parser: argparse.ArgumentParser):
  parser.add_argument('--input', required=True,
                      help='caption pairs: .tsv with a header row, a .json list, or .jsonl of objects')
  parser.add_argument('--out', required=True, help='output LLaVA JSON file')
  parser.add_argument('--image-key', default='image', help='column/key of the image path (default: %(default)s)')
  parser.add_argument('--caption-key', default='caption', help='column/key of the caption (default: %(default)s)')
  parser.add_argument('--id-key', default='id', help='column/key of the sample id; absent -> image file stem')
  parser.add_argument('--filter', action='store_true', help='apply concept-balanced filtering (see above)')
  parser.add_argument('--min-freq', type=int, default=3,
                      help='drop noun phrases found in fewer captions than this (default: %(default)s)')
  parser.add_argument('--max-per-phrase', type=int, default=100,
                      help='captions added per frequent noun phrase at most (default: %(default)s)')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the instruction draw and the subsampling (default: %(default)s)')


def main(args: argparse.Namespace) -> int:
  pairs = read_pairs(args.input, image_key=args.image_key, caption_key=args.caption_key, id_key=args.id_key)
  usable = [p for p in pairs if p['image'] and p['caption']]
  print(f'[pretrain] {len(pairs)} pairs read from {args.input}; '
        f'{len(pairs) - len(usable)} skipped (empty image or caption)', file=sys.stderr)
  if args.filter:
    keep, stats = concept_balanced_filter([p['caption'] for p in usable], min_freq=args.min_freq,
                                          max_per_phrase=args.max_per_phrase, seed=args.seed)
    print(f'[pretrain] concept-balanced filter (min_freq={args.min_freq}, max_per_phrase='
          f'{args.max_per_phrase}): ' + ' '.join(f'{k}={v}' for k, v in dataclasses.asdict(stats).items()),
          file=sys.stderr)
    usable = [usable[i] for i in keep]
  ids = collections.Counter(p['id'] for p in usable)
  duplicates = sum(n - 1 for n in ids.values() if n > 1)
  if duplicates:
    print(f'[pretrain] warning: {duplicates} samples share an id with another sample', file=sys.stderr)
  samples = [to_sample(p, args.seed) for p in usable]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(samples, f, ensure_ascii=False, indent=1)
  os.replace(args.out + '.tmp', args.out)
  print(f'[pretrain] wrote {len(samples)} samples to {args.out}', file=sys.stderr)
  return 0
