r"""LLaVA-Bench (COCO / In-the-Wild): answer, review with a judge model, summarize relative scores.

  python -m llava_jax.eval.llava_bench answer --checkpoint model/ --questions questions.jsonl \
      --image-folder images/ --out answers/model.jsonl
  python -m llava_jax.eval.llava_bench review --questions questions.jsonl --context context.jsonl \
      --reference answers_gpt4.jsonl --answers answers/model.jsonl --out reviews/model.jsonl \
      --base-url https://api.openai.com/v1 --model gpt-4o
  python -m llava_jax.eval.llava_bench summarize --reviews reviews/model.jsonl

Files follow the original release: questions JSONL (question_id, image, text, category in
conv|detail|complex), context JSONL (image or id, caption or captions, and for COCO instances
[{category, bbox}]), answers JSONL (question_id, text, answer_id, model_id).
The judge sees the context, the question, the reference answer (Assistant 1) and the candidate
answer (Assistant 2), and writes the two 1-10 scores on its first line. Reviews are cached in the
output JSONL (one record per question, last wins, `tuple` = [reference, candidate] or null when the
reply had no two scores); a rerun skips questions with a parsed review of the same request and asks
again for failed or unparsable ones. Relative score = mean(candidate) / mean(reference) * 100.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
from typing import Optional

from llava_jax import api_client
from llava_jax.datagen import coco
from llava_jax.eval import predict

CATEGORIES = ('conversation', 'detail', 'complex')
_CATEGORY = {'conv': 'conversation', 'conversation': 'conversation', 'detail': 'detail', 'complex': 'complex'}

JUDGE_SYSTEM = 'You are a careful, impartial reviewer of answers to questions about images.'
JUDGE_INSTRUCTION = (
    'Two AI assistants answered the user question above about an image. You cannot see the image; the '
    'context describes it. Judge how helpful, relevant, accurate and detailed each answer is, and give '
    'each assistant one overall score from 1 to 10, where higher is better.\n'
    'On the first line write only the two scores, Assistant 1 first, separated by a space. From the '
    'second line on, explain your judgement. Do not let the order in which the answers appear or their '
    'length sway you.')


def category_name(raw: str) -> str:
  return _CATEGORY.get(raw, raw)


def read_jsonl(path: str, required: tuple) -> list[dict]:
  rows = []
  for lineno, row in predict.jsonl_records(path):
    missing = [k for k in required if k not in row]
    if missing:
      raise ValueError(f'{path}:{lineno}: missing key(s) {missing}')
    rows.append(row)
  return rows


def context_text(ctx: dict) -> str:
  """Captions (one per line), then for COCO a blank line and `category: [x1, y1, x2, y2]` per box."""
  captions = ctx.get('captions') or [ctx.get('caption', '')]
  lines = [str(c).strip() for c in captions if str(c).strip()]
  boxes = [coco.format_box(i['category'], i['bbox']) for i in ctx.get('instances') or []]
  return '\n'.join(lines + ([''] + boxes if boxes else []))


def review_messages(context: str, question: str, reference: str, candidate: str) -> list[dict]:
  content = (f'[Context]\n{context}\n\n[Question]\n{question}\n\n'
             f'[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n'
             f'[Assistant 2]\n{candidate}\n\n[End of Assistant 2]\n\n[System]\n{JUDGE_INSTRUCTION}\n\n')
  return [{'role': 'system', 'content': JUDGE_SYSTEM}, {'role': 'user', 'content': content}]


_LABEL = re.compile(r'assistant\s*[12]\s*[:=-]?', re.IGNORECASE)
_NUMBER = re.compile(r'(?<![\w.])\d+(?:\.\d+)?(?!\w|\.\d)')


def parse_scores(reply: str) -> Optional[list]:
  """[reference, candidate] from the first non-empty line, e.g. '8 7', '8, 7', '**8** 7.5',
  'Assistant 1: 8 Assistant 2: 7'; None unless exactly two numbers in 1..10 are there."""
  first = next((line for line in reply.splitlines() if line.strip()), '')
  numbers = _NUMBER.findall(_LABEL.sub(' ', first.replace('*', ' ').replace('/10', ' ')))
  if len(numbers) != 2:
    return None
  scores = [float(n) for n in numbers]
  return scores if all(1 <= s <= 10 for s in scores) else None


def make_review_jobs(questions, contexts, references, answers, judge_model: str):
  """(jobs, counts of questions left out because an input lacks them)."""
  by_image = {}
  for ctx in contexts:
    for k in ('image', 'id'):
      if k in ctx:
        by_image.setdefault(str(ctx[k]), ctx)
  reference = {str(a['question_id']): a for a in references}
  candidate = {str(a['question_id']): a for a in answers}
  jobs, missing = [], collections.Counter()
  for q in questions:
    qid = str(q['question_id'])
    image = str(q.get('image', ''))
    ctx = by_image.get(image) or by_image.get(os.path.splitext(image)[0])
    for name, value in (('context', ctx), ('reference', reference.get(qid)), ('answer', candidate.get(qid))):
      if value is None:
        missing[name] += 1
    if ctx is None or qid not in reference or qid not in candidate:
      continue
    messages = review_messages(context_text(ctx), q['text'], reference[qid]['text'], candidate[qid]['text'])
    meta = {'question_id': q['question_id'], 'category': category_name(q['category']),
            'answer1_id': reference[qid].get('answer_id'), 'answer2_id': candidate[qid].get('answer_id'),
            'fingerprint': api_client.request_fingerprint(judge_model, messages)}
    jobs.append(api_client.Job(key=qid, messages=messages, meta=meta))
  return jobs, missing


def _review_record(record: dict) -> dict:
  record['content'] = record.pop('reply')
  record['tuple'] = parse_scores(record['content'])
  return record


def run_review(client: api_client.ChatClient, questions, contexts, references, answers, out_path: str,
               log=api_client.log_stderr) -> dict:
  jobs, missing = make_review_jobs(questions, contexts, references, answers, client.config.model)
  for name, n in missing.items():
    log(f'[review] {n} questions have no {name}; left out')
  current = lambda record, job: record is not None and record.get('fingerprint') == job.meta['fingerprint']
  done = lambda record, job: current(record, job) and record.get('tuple') is not None
  with api_client.ResultStore(out_path) as store:
    run = api_client.run_jobs(client, jobs, store, is_done=done, postprocess=_review_record, log=log)
    records = [store.get(j.key) for j in jobs if current(store.get(j.key), j)]
  usage = client.usage
  stats = dict(questions=len(questions), reviewed=sum(r['tuple'] is not None for r in records),
               unparsable=sum(r['tuple'] is None for r in records), pending=len(jobs) - len(records),
               missing=sum(missing.values()), skipped=run.skipped, requests=usage['requests'],
               retries=usage['retries'], total_tokens=usage['total_tokens'], interrupted=run.interrupted)
  log('stats: ' + ' '.join(f'{k}={v}' for k, v in stats.items()))
  return stats


def summarize(reviews: list[dict], question_ids=None) -> dict:
  """Relative score per category and overall from review records (last record per question wins)."""
  latest = {}
  for r in reviews:
    latest[str(r['question_id'])] = r
  if question_ids is not None:
    wanted = {str(q) for q in question_ids}
    missing = len(wanted - set(latest))
    latest = {k: v for k, v in latest.items() if k in wanted}
  scored = collections.defaultdict(list)
  for r in latest.values():
    if r.get('tuple') is not None:
      scored[category_name(r['category'])].append(r['tuple'])
      scored['overall'].append(r['tuple'])

  def block(pairs):
    reference = sum(p[0] for p in pairs) / len(pairs)
    candidate = sum(p[1] for p in pairs) / len(pairs)
    return {'relative': candidate / reference * 100, 'candidate': candidate, 'reference': reference,
            'count': len(pairs)}

  order = [c for c in CATEGORIES if c in scored] + sorted(set(scored) - set(CATEGORIES) - {'overall'})
  result = {c: block(scored[c]) for c in order + (['overall'] if scored else [])}
  result['reviews'] = len(latest)
  result['unparsable'] = sum(r.get('tuple') is None for r in latest.values())
  if question_ids is not None:
    result['missing'] = missing
  return result


# ---------------------------------------------------------------------------------------------------
# CLI


def _cmd_answer(args) -> int:
  from llava_jax.eval import predict  # looked up when answering (jax and the model load inside it)
  stats = predict.answer_questions(
      args.checkpoint, args.questions, args.image_folder, args.out, template=args.template,
      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
      seed=args.seed, model_id=args.model_id)
  print(f'[answer] {json.dumps(stats)}', file=sys.stderr)
  return 0


def _cmd_review(args) -> int:
  questions = read_jsonl(args.questions, ('question_id', 'image', 'text', 'category'))
  contexts = read_jsonl(args.context, ())
  references = read_jsonl(args.reference, ('question_id', 'text'))
  answers = read_jsonl(args.answers, ('question_id', 'text'))
  client = api_client.client_from_args(args)
  stats = run_review(client, questions, contexts, references, answers, args.out)
  if stats['pending'] or stats['unparsable']:
    print(f'[review] {stats["pending"]} reviews failed and {stats["unparsable"]} were unparsable; '
          'rerun the same command to ask again', file=sys.stderr)
    return 1
  return 0


def _cmd_summarize(args) -> int:
  reviews = read_jsonl(args.reviews, ('question_id', 'category'))
  ids = [q['question_id'] for q in read_jsonl(args.questions, ('question_id',))] if args.questions else None
  print(json.dumps(summarize(reviews, ids)))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m llava_jax.eval.llava_bench', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)

  p = sub.add_parser('answer', help='answer the question JSONL with a model (batched, resumable)')
  predict.add_answer_args(p, 'questions JSONL (question_id, image, text, category)')
  p.set_defaults(fn=_cmd_answer)

  p = sub.add_parser('review', help='score candidate vs reference answers with a judge model')
  p.add_argument('--questions', required=True, help='questions JSONL (question_id, image, text, category)')
  p.add_argument('--context', required=True, help='context JSONL (image/id, caption or captions, instances)')
  p.add_argument('--reference', required=True, help='reference answers JSONL (the original answers_gpt4.jsonl)')
  p.add_argument('--answers', required=True, help='candidate answers JSONL (question_id, text, answer_id)')
  p.add_argument('--out', required=True, help='reviews JSONL, also the resumable cache')
  api_client.add_client_args(p, temperature=0.2, max_tokens=1024)
  p.set_defaults(fn=_cmd_review)

  p = sub.add_parser('summarize', help='relative scores per category and overall, as one JSON object',
                     description='Prints {category: {relative, candidate, reference, count}, ..., overall: {...}, '
                                 'reviews, unparsable[, missing]}: relative = 100 * candidate / reference, where '
                                 'candidate and reference are mean 1-10 scores over the parsed reviews (the '
                                 'original script prints these means x 10). overall pools every parsed review.')
  p.add_argument('--reviews', required=True, help='reviews JSONL written by review')
  p.add_argument('--questions', help='questions JSONL: only these questions, and count the missing ones')
  p.set_defaults(fn=_cmd_summarize)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.fn(args)
  except (FileNotFoundError, ValueError, api_client.ApiError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
