"""ScienceQA with GPT-4 as the judge (paper §5.2, 92.53%): ask the judge, then score as the original does.

`judge` asks a text-only judge model (1) for its own answer to every problem of the split, and (2) where its answer
and ours do not parse to the same letter, again, shown the question and both answers, for the final answer (the
"re-query"). Replies are appended to resumable stores in the out dir as they arrive (`gpt4_answers.jsonl`,
`requery.jsonl`; a rerun asks only what is missing, or what changed: each reply keeps a fingerprint of its request),
and the files the original scorer reads are written from them:
  gpt4_result.json       {"outputs": {pid: text}}
  requery_result.jsonl   {"question_id", "text"} per line
  rejects.jsonl          problems without a usable reply: {"question_id", "stage", "reason"[, "reply"]}; a failed
                         request is asked again on a rerun, an unparsable reply counts as FAILED (as the original)

`score_requery` reproduces `llava/eval/eval_science_qa_gpt4_requery.py` on the same inputs: its counts of ours,
GPT-4, GPT-4 with our answer where GPT-4 gave none, the re-query (the final score) and the upper bound. Answers are
parsed by exactly one match of `The answer is ([A-Z]).`; the original then picks a *random* option for an answer
that does not parse or names a letter beyond the choices. Here that option comes from `random.Random(seed)` drawn
in the original's order (ours, GPT-4, re-query for each problem in split order), so with a seed the numbers equal
what the original prints after `random.seed(seed)`; the count of random picks is reported.
"""
from __future__ import annotations

import collections
import json
import os
import random
from typing import Callable, Optional

from llava_jax import api_client
from llava_jax.eval.scienceqa import _ANSWER_IS, FAILED, OPTIONS, _check_problem, build_question

GPT4_FILE, REQUERY_FILE = 'gpt4_answers.jsonl', 'requery.jsonl'
GPT4_RESULT, REQUERY_RESULT, REJECTS = 'gpt4_result.json', 'requery_result.jsonl', 'rejects.jsonl'

ANSWER_SYSTEM = ('You are an expert science teacher answering a multiple-choice question. You cannot see any image '
                 'the question may refer to; use the context given. Explain your reasoning briefly, then end with '
                 'exactly one sentence "The answer is X." where X is the letter of the correct option.')
REQUERY_SYSTEM = ('You are an expert science teacher judging two answers to a multiple-choice question. Assistant 1 '
                  'could see the image the question may refer to; Assistant 2 could not. Decide which final answer '
                  'is correct, explain briefly, then end with exactly one sentence "The answer is X." where X is the '
                  'letter of the correct option.')


def parse_letter(text: str) -> str:
  """The original re-query script's parse: exactly one `The answer is ([A-Z]).` (any character after the letter)."""
  found = _ANSWER_IS.findall(text)
  return found[0] if len(found) == 1 else FAILED


def answer_messages(problem: dict) -> list[dict]:
  return [{'role': 'system', 'content': ANSWER_SYSTEM}, {'role': 'user', 'content': build_question(problem)}]


def requery_messages(problem: dict, ours: str, gpt4: str) -> list[dict]:
  user = f'{build_question(problem)}\n\n[Assistant 1]\n{ours}\n\n[Assistant 2]\n{gpt4}'
  return [{'role': 'system', 'content': REQUERY_SYSTEM}, {'role': 'user', 'content': user}]


def split_problems(problems: dict, pid_splits: dict, split: str) -> dict:
  if split not in pid_splits:
    raise ValueError(f'pid_splits.json has no split {split!r}; available: {sorted(pid_splits)}')
  out = {}
  for pid in pid_splits[split]:
    if pid not in problems:
      raise ValueError(f'pid_splits.json[{split!r}] names problem {pid!r}, absent from problems.json')
    _check_problem(pid, problems[pid])
    out[pid] = problems[pid]
  return out


# --------------------------------------------------------------------------------------------------- judge

def _ask(client, jobs, path, log) -> tuple[dict, api_client.RunStats]:
  """Runs `jobs` into the store at `path`. Returns ({pid: reply} for current replies, run stats)."""
  current = lambda record, job: record is not None and record.get('fingerprint') == job.meta['fingerprint']
  with api_client.ResultStore(path) as store:
    run = api_client.run_jobs(client, jobs, store, is_done=current, log=log)
    replies = {j.key: store.get(j.key)['reply'] for j in jobs if current(store.get(j.key), j)}
  return replies, run


def _job(pid, messages, model):
  return api_client.Job(key=pid, messages=messages,
                        meta={'question_id': pid, 'fingerprint': api_client.request_fingerprint(model, messages)})


def run_judge(client: api_client.ChatClient, problems: dict, pid_splits: dict, predictions: dict, out_dir: str, *,
              split: str = 'test', log: Callable[[str], None] = api_client.log_stderr) -> dict:
  """Asks the judge for its answers and the re-queries; writes the out dir's files (module docstring). Problems
  without our prediction are left out and counted. Returns stats."""
  split_probs = split_problems(problems, pid_splits, split)
  model = client.config.model
  os.makedirs(out_dir, exist_ok=True)
  pids = [pid for pid in split_probs if pid in predictions]
  if len(pids) < len(split_probs):
    log(f'[judge] {len(split_probs) - len(pids)} problems have no prediction of ours; left out')
  gpt4, run1 = _ask(client, [_job(p, answer_messages(split_probs[p]), model) for p in pids],
                    os.path.join(out_dir, GPT4_FILE), log)
  disagree = [p for p in pids if p in gpt4 and not (
      parse_letter(predictions[p]) == parse_letter(gpt4[p]) != FAILED)]
  requery, run2 = _ask(client, [_job(p, requery_messages(split_probs[p], predictions[p], gpt4[p]), model)
                                for p in disagree], os.path.join(out_dir, REQUERY_FILE), log)

  with open(os.path.join(out_dir, GPT4_RESULT), 'w') as f:
    json.dump({'outputs': {p: gpt4[p] for p in pids if p in gpt4}}, f, indent=1)
  with open(os.path.join(out_dir, REQUERY_RESULT), 'w') as f:
    for p in disagree:
      if p in requery:
        f.write(json.dumps({'question_id': p, 'text': requery[p]}) + '\n')
  rejects = []
  for stage, asked, replies in (('gpt4', pids, gpt4), ('requery', disagree, requery)):
    for p in asked:
      if p not in replies:
        rejects.append({'question_id': p, 'stage': stage, 'reason': 'no reply (request failed; rerun to ask again)'})
      elif parse_letter(replies[p]) == FAILED:
        rejects.append({'question_id': p, 'stage': stage, 'reason': 'unparsable (counts as FAILED)',
                        'reply': replies[p]})
  with open(os.path.join(out_dir, REJECTS), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rejects)
  reasons = collections.Counter(r['reason'].split(' ')[0] for r in rejects)
  stats = dict(problems=len(split_probs), asked=len(pids), gpt4_answers=len(gpt4), disagree=len(disagree),
               requeries=len(requery), failed=reasons['no'], unparsable=reasons['unparsable'],
               skipped=run1.skipped + run2.skipped, requests=client.usage['requests'],
               interrupted=run1.interrupted or run2.interrupted)
  log('[judge] ' + ' '.join(f'{k}={v}' for k, v in stats.items()))
  return stats


# --------------------------------------------------------------------------------------------------- score

def read_gpt4_result(path: str) -> dict:
  """The original's `--gpt4-result` JSON: {"outputs": {pid: text}}."""
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON: {e}') from None
  outputs = data.get('outputs') if isinstance(data, dict) else None
  if not isinstance(outputs, dict) or not all(isinstance(v, str) for v in outputs.values()):
    raise ValueError(f'{path}: expected {{"outputs": {{question_id: answer text}}}}')
  return outputs


def score_requery(problems: dict, pid_splits: dict, ours: dict, gpt4: dict, requery: dict, *, seed: int,
                  split: str = 'test', ours_path: str = 'predictions', gpt4_path: str = 'gpt4 result'):
  """(result, per-problem final option index) as `eval_science_qa_gpt4_requery.py` computes them.

  ours / requery: {pid: text} (answers JSONL); gpt4: {pid: text}. Every problem of the split needs our answer and
  GPT-4's (the original asserts it); a missing re-query counts as unparsable, so our answer stands.
  """
  split_probs = split_problems(problems, pid_splits, split)
  for name, answers, path in (('our prediction', ours, ours_path), ('GPT-4 answer', gpt4, gpt4_path)):
    missing = [p for p in split_probs if p not in answers]
    if missing:
      raise ValueError(f'{path}: no {name} for {len(missing)} problems of split {split!r}, e.g. {missing[:3]}')
  rng = random.Random(seed)
  draws = 0

  def option(letter, choices):
    nonlocal draws
    if letter in OPTIONS[:len(choices)]:
      return OPTIONS.index(letter)
    draws += 1
    return rng.choice(range(len(choices)))

  n = collections.Counter()
  final = {}
  for pid, prob in split_probs.items():
    our_letter, gpt4_letter = parse_letter(ours[pid]), parse_letter(gpt4[pid])
    n['missing_requery'] += pid not in requery
    requery_letter = parse_letter(requery.get(pid, 'MISSING'))
    our_idx, gpt4_idx = option(our_letter, prob['choices']), option(gpt4_letter, prob['choices'])
    requery_idx = option(requery_letter, prob['choices'])
    answer = prob['answer']
    n['total'] += 1
    n['our_correct'] += our_idx == answer
    n['gpt4_failed'] += gpt4_letter == FAILED
    n['gpt4_correct'] += gpt4_idx == answer
    # Where GPT-4 gave no answer, ours stands in for it.
    n['gpt4_ourvisual_correct'] += (our_idx if gpt4_letter == FAILED else gpt4_idx) == answer
    final[pid] = our_idx if requery_letter == FAILED else requery_idx
    n['requery_correct'] += final[pid] == answer
    n['correct_upperbound'] += gpt4_idx == answer or our_idx == answer
  total = n['total']
  block = lambda key: {'correct': n[key], 'accuracy': n[key] / total if total else None}
  result = {'split': split, 'count': total, 'seed': seed, 'random_picks': draws,
            'accuracy': block('requery_correct')['accuracy'],
            'ours': block('our_correct'), 'gpt4': block('gpt4_correct'), 'gpt4_failed': n['gpt4_failed'],
            'gpt4_ourvisual': block('gpt4_ourvisual_correct'), 'requery': block('requery_correct'),
            'upper_bound': block('correct_upperbound'), 'missing_requery': n['missing_requery']}
  return result, final


def original_output(result: dict, final: dict) -> dict:
  """The JSON the original writes to `--output-result`."""
  return {'acc': result['requery']['correct'] / result['count'] * 100, 'correct': result['requery']['correct'],
          'count': result['count'], 'results': final, 'outputs': {}}


def judge_args(parser):
  """Flags of `python -m llava_jax.eval.scienceqa judge`."""
  parser.add_argument('--problems', required=True, help='official problems.json; pid_splits.json is read beside it')
  parser.add_argument('--predictions', required=True, help='our answers JSONL: question_id, prompt, text per line')
  parser.add_argument('--out-dir', required=True,
                      help=f'writes {GPT4_RESULT}, {REQUERY_RESULT}, {REJECTS}; its {GPT4_FILE} and {REQUERY_FILE} '
                           'make a rerun ask only what is missing')
  parser.add_argument('--split', default='test')
  api_client.add_client_args(parser, temperature=0.0, max_tokens=1024)


def requery_summary(result: dict) -> Optional[str]:
  """The original's printed lines, for a reader comparing the two."""
  total = result['count']
  if not total:
    return None
  line = lambda name, key: (f"Total: {total}, {name}: {result[key]['correct']}, "
                            f"Accuracy: {result[key]['accuracy'] * 100:.2f}%")
  return '\n'.join([line('Our-Correct', 'ours'), line('GPT-4-Correct', 'gpt4'),
                    f"Total: {total}, GPT-4 NO-ANS (RANDOM): {result['gpt4_failed']}, "
                    f"Percentage: {result['gpt4_failed'] / total * 100:.2f}%",
                    line('GPT-4-OursVisual-Correct', 'gpt4_ourvisual'), line('Requery-Correct', 'requery'),
                    line('Correct upper', 'upper_bound')])
