"""`python -m llava_jax.datagen instruct`: COCO annotations -> GPT-assisted instruction data.

For every image and kind (conversation / detail / complex) one chat request carries the image's
symbolic context (captions + normalized boxes, see coco.py). Replies are cached in
`OUT/responses.jsonl` (resumable: finished keys are skipped on rerun), and after every run the
outputs are rebuilt from that cache:
  OUT/llava_instruct.json   accepted samples, LLaVA JSON, image order then kind order
  OUT/rejects.jsonl         malformed replies with the reason (kept; `--retry-rejects` asks again)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from typing import Iterable, Iterator

from llava_jax import api_client
from llava_jax.datagen import coco, prompts

IMAGE = '<image>'
_MARKER = re.compile(r'^[\s*#>_-]*(question|answer)\s*[*_]*\s*:\s*[*_]*\s*', re.IGNORECASE)
_SEPARATOR = re.compile(r'^\s*(={3,}|-{3,})\s*$')
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
MIN_DETAIL_WORDS = 8


class MalformedReply(ValueError):
  """A reply that cannot become a training sample; the message is the recorded reason."""


def _clean(text: str) -> str:
  """Drops `<image>` (the sample places it) and collapses whitespace within each line."""
  return '\n'.join(' '.join(line.replace(IMAGE, ' ').split()) for line in text.strip().splitlines()).strip()


def parse_qa(text: str) -> list[tuple[str, str]]:
  """`Question: ...` / `Answer: ...` blocks (continuation lines allowed, `===` separators ignored)."""
  blocks = []  # [role, lines]
  for line in text.strip().splitlines():
    if _SEPARATOR.match(line):
      continue
    m = _MARKER.match(line)
    if m:
      blocks.append([m.group(1).lower(), [line[m.end():]]])
    elif blocks:
      blocks[-1][1].append(line)
    elif line.strip():
      raise MalformedReply(f'text before the first Question: line: {line.strip()[:60]!r}')
  if not blocks:
    raise MalformedReply('no Question:/Answer: lines')
  pairs = []
  for i in range(0, len(blocks), 2):
    q = blocks[i]
    a = blocks[i + 1] if i + 1 < len(blocks) else None
    if q[0] != 'question' or a is None or a[0] != 'answer':
      raise MalformedReply(f'exchange {i // 2 + 1} is not a Question: line followed by an Answer: line')
    q_text, a_text = _clean('\n'.join(q[1])), _clean('\n'.join(a[1]))
    if not _WORD.search(q_text) or not _WORD.search(a_text):
      raise MalformedReply(f'exchange {i // 2 + 1} has an empty question or answer')
    pairs.append((q_text, a_text))
  return pairs


def parse_reply(kind: str, text: str, *, instruction: str = '', finish_reason: str = 'stop') -> list[dict]:
  """A reply -> LLaVA conversation turns with `<image>\\n` at the front of the first human turn."""
  if finish_reason == 'length':
    raise MalformedReply('reply cut off at max_tokens (finish_reason=length)')
  if kind == 'detail':
    body = _clean(text)
    if any(_MARKER.match(line) for line in body.splitlines()):
      raise MalformedReply('detail reply contains Question:/Answer: lines')
    words = _WORD.findall(body)
    if len(words) < MIN_DETAIL_WORDS:
      raise MalformedReply(f'detail reply has {len(words)} words (< {MIN_DETAIL_WORDS})')
    if sum(map(len, words)) < 0.6 * len(''.join(body.split())):
      raise MalformedReply('detail reply is mostly not words')
    pairs = [(instruction, body)]
  else:
    pairs = parse_qa(text)
    if kind == 'complex' and len(pairs) != 1:
      raise MalformedReply(f'complex reply has {len(pairs)} exchanges (expected 1)')
  turns = []
  for i, (q, a) in enumerate(pairs):
    turns.append({'from': 'human', 'value': f'{IMAGE}\n{q}' if i == 0 else q})
    turns.append({'from': 'gpt', 'value': a})
  return turns


def job_key(image_id, kind: str) -> str:
  return f'{image_id}:{kind}'


def make_jobs(contexts: Iterable[coco.ImageContext], kinds: Iterable[str], seed: int) -> Iterator[api_client.Job]:
  """One request per (image, kind); detail instructions drawn per key so reruns draw the same."""
  kinds = tuple(kinds)
  for ctx in contexts:
    rendered = ctx.render()
    for kind in kinds:
      key = job_key(ctx.image_id, kind)
      meta = {'image_id': ctx.image_id, 'image': ctx.file_name, 'kind': kind}
      if kind == 'detail':
        meta['instruction'] = random.Random(f'{seed}:{key}').choice(prompts.DETAIL_INSTRUCTIONS)
      yield api_client.Job(key=key, messages=prompts.build_messages(kind, rendered), meta=meta)


def record_to_sample(record: dict) -> dict:
  """Raises MalformedReply."""
  turns = parse_reply(record['kind'], record['reply'], instruction=record.get('instruction', ''),
                      finish_reason=record.get('finish_reason') or 'stop')
  return {'id': f'{record["image_id"]}_{record["kind"]}', 'image': record['image'], 'conversations': turns}


def build_outputs(store: api_client.ResultStore, keys: list[str]) -> tuple[list[dict], list[dict]]:
  """(accepted samples, rejects) for `keys` in order, from the cached replies."""
  samples, rejects = [], []
  for key in keys:
    record = store.get(key)
    if record is None:
      continue
    try:
      samples.append(record_to_sample(record))
    except MalformedReply as e:
      rejects.append({'key': key, 'image_id': record['image_id'], 'kind': record['kind'],
                      'reason': str(e), 'reply': record['reply']})
  return samples, rejects


def _write_atomic(path: str, text: str):
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)


def run_instruct(client: api_client.ChatClient, contexts: list[coco.ImageContext], out_dir: str, *,
                 kinds=prompts.KINDS, seed: int = 0, retry_rejects: bool = False,
                 log=api_client.log_stderr) -> dict:
  """Sends the pending requests, rebuilds the outputs, and returns the stats (also logged as one line)."""
  os.makedirs(out_dir, exist_ok=True)
  keys = [job_key(c.image_id, k) for c in contexts for k in kinds]

  def is_done(record, job):
    if not retry_rejects:
      return True
    try:
      record_to_sample(record)
      return True
    except MalformedReply:
      return False

  with api_client.ResultStore(os.path.join(out_dir, 'responses.jsonl')) as store:
    if store.dropped_partial:
      log(f'[instruct] dropped 1 unfinished record at the end of {store.path} (will be requested again)')
    run = api_client.run_jobs(client, make_jobs(contexts, kinds, seed), store, is_done=is_done, log=log)
    samples, rejects = build_outputs(store, keys)
    all_tokens = sum(store.get(k)['usage'].get('total_tokens', 0) for k in keys if k in store)
  _write_atomic(os.path.join(out_dir, 'llava_instruct.json'), json.dumps(samples, ensure_ascii=False, indent=1))
  _write_atomic(os.path.join(out_dir, 'rejects.jsonl'),
                ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rejects))
  usage = client.usage
  stats = dict(requests=usage['requests'], retries=usage['retries'], failed=run.failed,
               prompt_tokens=usage['prompt_tokens'], completion_tokens=usage['completion_tokens'],
               total_tokens=usage['total_tokens'], tokens_stored=all_tokens,
               accepted=len(samples), rejected=len(rejects), pending=len(keys) - len(samples) - len(rejects),
               skipped=run.skipped, interrupted=run.interrupted)
  log('stats: ' + ' '.join(f'{k}={v}' for k, v in stats.items()))
  return stats


def add_args(parser: argparse.ArgumentParser):
  parser.add_argument('--captions', required=True, help='COCO captions JSON (images + annotations with caption)')
  parser.add_argument('--instances', default=None,
                      help='COCO instances JSON (annotations with bbox [x,y,w,h] + category_id, categories)')
  parser.add_argument('--out', required=True,
                      help='output folder (responses.jsonl, llava_instruct.json, rejects.jsonl)')
  parser.add_argument('--kinds', default=','.join(prompts.KINDS),
                      help='comma-separated request kinds out of %s (default: all)' % ','.join(prompts.KINDS))
  parser.add_argument('--limit', type=int, default=None, help='only the first N images (by image id)')
  parser.add_argument('--seed', type=int, default=0, help='seed of the detail-instruction draw (default: %(default)s)')
  parser.add_argument('--retry-rejects', action='store_true', help='ask again for replies that were rejected')
  parser.add_argument('--dry-run', action='store_true',
                      help='print the number of requests and the first request, send nothing')
  api_client.add_client_args(parser, temperature=1.0, max_tokens=1024)


def main(args: argparse.Namespace) -> int:
  kinds = tuple(k.strip() for k in args.kinds.split(',') if k.strip())
  bad = [k for k in kinds if k not in prompts.KINDS]
  if bad or not kinds:
    raise SystemExit(f'--kinds: unknown kind(s) {bad}; allowed: {prompts.KINDS}')
  contexts, cstats = coco.load_coco_contexts(args.captions, args.instances)
  if args.limit is not None:
    contexts = contexts[:args.limit]
  print(f'[instruct] {len(contexts)} images ({cstats.no_caption} without captions skipped, '
        f'{cstats.bad_boxes} invalid boxes dropped) x {len(kinds)} kinds', file=sys.stderr)
  if args.dry_run:
    first = next(make_jobs(contexts, kinds, args.seed), None)
    print(json.dumps({'requests': len(contexts) * len(kinds),
                      'first_request': first and {'key': first.key, 'messages': first.messages}}, indent=1))
    return 0
  client = api_client.client_from_args(args)
  stats = run_instruct(client, contexts, args.out, kinds=kinds, seed=args.seed, retry_rejects=args.retry_rejects)
  if stats['pending']:
    print(f'[instruct] {stats["pending"]} requests unfinished; rerun the same command to finish them',
          file=sys.stderr)
    return 1
  return 0
