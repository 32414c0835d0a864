"""ScienceQA: convert the official release, predict with a model, score answers.

  python -m llava_jax.eval.scienceqa convert --problems sqa/problems.json --image-folder sqa/images --out-dir out/
  python -m llava_jax.eval.scienceqa predict --checkpoint model/ --questions out/scienceqa_test_questions.jsonl \
      --image-folder sqa/images --out answers.jsonl
  python -m llava_jax.eval.scienceqa score --problems sqa/problems.json --predictions answers.jsonl
  python -m llava_jax.eval.scienceqa judge --problems sqa/problems.json --predictions answers.jsonl --out-dir judge/ \
      --model gpt-4 [--base-url URL --api-key-env OPENAI_API_KEY]
  python -m llava_jax.eval.scienceqa score --problems sqa/problems.json --predictions answers.jsonl \
      --gpt4-result judge/gpt4_result.json --requery-result judge/requery_result.jsonl --seed 0

Prompt format QCM -> LEA (LLAVA.md §7): `{question}\\nContext: {hint or N/A}\\nOptions: (A) x (B) y`, target
`{lecture} {solution} The answer is X.`. Answer parsing and the per-category breakdown follow the original
release (`llava/eval/eval_science_qa.py`) and the ScienceQA authors' `tools/evaluate_acc.py`. GPT-4 as the judge
(paper §5.2): `judge` and `score --gpt4-result`, in scienceqa_judge.py.
"""

import argparse
import collections
import json
import os
import re
import sys

from llava_jax.eval import predict

OPTIONS = ('A', 'B', 'C', 'D', 'E')
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."
FAILED = 'FAILED'
SUBJECTS = {'natural science': 'NAT', 'social science': 'SOC', 'language science': 'LAN'}
CATEGORIES = ('NAT', 'SOC', 'LAN', 'TXT', 'IMG', 'NO', 'G1-6', 'G7-12')
# The original regex: the trailing '.' is any character, so "The answer is A" at the very end does not match.
_ANSWER_IS = re.compile(r'The answer is ([A-Z]).')


# ----------------------------------------------------------------------------------------------- prompts

def build_question(problem):
  """QCM prompt text, without the image token: `{question}\\nContext: {c}\\nOptions: (A) x (B) y`."""
  context = problem.get('hint') or ''
  context = context.strip() or 'N/A'
  choices = ' '.join(f'({OPTIONS[i]}) {c}' for i, c in enumerate(problem['choices']))
  text = f"{problem['question']}\nContext: {context}\nOptions: {choices}\n"
  return text.replace('  ', ' ').strip()


def build_answer(problem):
  """LEA target: `{lecture} {solution} The answer is X.`"""
  text = f"{problem.get('lecture', '')} {problem.get('solution', '')} The answer is {OPTIONS[problem['answer']]}."
  return text.replace('  ', ' ').strip()


def _check_problem(pid, problem):
  for key in ('question', 'choices', 'answer', 'subject', 'grade'):
    if key not in problem:
      raise ValueError(f'problems.json: problem {pid!r} has no {key!r} field')
  if not 1 <= len(problem['choices']) <= len(OPTIONS):
    raise ValueError(f'problems.json: problem {pid!r} has {len(problem["choices"])} choices; '
                     f'supported: 1..{len(OPTIONS)}')
  if not 0 <= problem['answer'] < len(problem['choices']):
    raise ValueError(f'problems.json: problem {pid!r} answer index {problem["answer"]} out of range')


def categories(problem):
  """Categories a problem counts toward. Context follows the ScienceQA authors' evaluate_acc.py:
  TXT = has a hint, IMG = has an image (a problem with both counts toward both), NO = neither."""
  cats = [SUBJECTS[problem['subject']]]
  if problem.get('hint'):
    cats.append('TXT')
  if problem.get('image'):
    cats.append('IMG')
  if not problem.get('hint') and not problem.get('image'):
    cats.append('NO')
  grade = int(problem['grade'].removeprefix('grade'))
  cats.append('G1-6' if grade <= 6 else 'G7-12')
  return cats


# ----------------------------------------------------------------------------------------------- convert

def _image_path(image_folder, split, pid, image):
  """Relative image path under `image_folder`: official layout `{split}/{pid}/{image}` or flat `{pid}/{image}`."""
  for rel in (os.path.join(split, pid, image), os.path.join(pid, image)):
    if image_folder is None or os.path.exists(os.path.join(image_folder, rel)):
      return rel
  return None


def convert(problems, pid_splits, *, train_splits, eval_split, image_folder=None, single_pred_prompt=False):
  """Official release -> (LLaVA JSON records for training, question records for eval, stats).

  Training records: `{"id", "image"?, "conversations": [human "<image>\\n" + QCM, gpt LEA]}`.
  Question records: `{"question_id", "image"?, "text", "category"}` (no `<image>` token in `text`; `predict`
  puts it in front when `image` is present, like the original `model_vqa_science`).
  Problems whose image file is missing under `image_folder` are skipped and counted.
  """
  stats = collections.Counter()

  def records(split):
    if split not in pid_splits:
      raise ValueError(f'pid_splits.json has no split {split!r}; available: {sorted(pid_splits)}')
    for pid in pid_splits[split]:
      if pid not in problems:
        raise ValueError(f'pid_splits.json[{split!r}] names problem {pid!r}, absent from problems.json')
      problem = problems[pid]
      _check_problem(pid, problem)
      image = None
      if problem.get('image'):
        image = _image_path(image_folder, split, pid, problem['image'])
        if image is None:
          stats[f'{split}_missing_image'] += 1
          continue
      stats[split] += 1
      yield pid, problem, image

  train = []
  for split in train_splits:
    for pid, problem, image in records(split):
      question = build_question(problem)
      record = {'id': pid}
      if image is not None:
        record['image'] = image
        question = '<image>\n' + question
      record['conversations'] = [{'from': 'human', 'value': question},
                                 {'from': 'gpt', 'value': build_answer(problem)}]
      train.append(record)
  questions = []
  for pid, problem, image in records(eval_split):
    text = build_question(problem)
    if single_pred_prompt:
      text += '\n' + SINGLE_PRED_PROMPT
    record = {'question_id': pid}
    if image is not None:
      record['image'] = image
    record.update(text=text, category=SUBJECTS[problem['subject']])
    questions.append(record)
  return train, questions, dict(stats)


# ----------------------------------------------------------------------------------------------- score

def parse_answer(text, options=OPTIONS):
  """Answer letter in the original release's order, or 'FAILED':
  the whole text is one option letter; else it starts with `X. `; else exactly one `The answer is ([A-Z]).`."""
  if text in options:
    return text
  if len(text) >= 3 and text[0] in options and text[1:3] == '. ':
    return text[0]
  found = _ANSWER_IS.findall(text)
  if len(found) == 1:
    return found[0]
  return FAILED


def score(problems, pid_splits, predictions, split='test'):
  """Accuracy of `predictions` ({question_id: text}) on `split`.

  A problem without a prediction counts as FAILED (wrong), as in the original. A parsed letter beyond the
  problem's choices is wrong but not FAILED. Returns a JSON-ready dict.
  """
  if split not in pid_splits:
    raise ValueError(f'pid_splits.json has no split {split!r}; available: {sorted(pid_splits)}')
  pids = pid_splits[split]
  total = collections.Counter()
  correct = collections.Counter()
  failed = missing = n_correct = 0
  details = []
  for pid in pids:
    if pid not in problems:
      raise ValueError(f'pid_splits.json[{split!r}] names problem {pid!r}, absent from problems.json')
    problem = problems[pid]
    _check_problem(pid, problem)
    if pid in predictions:
      parsed = parse_answer(predictions[pid])
    else:
      parsed, missing = FAILED, missing + 1
    failed += parsed == FAILED
    ok = parsed in OPTIONS[:len(problem['choices'])] and OPTIONS.index(parsed) == problem['answer']
    n_correct += ok
    for cat in categories(problem):
      total[cat] += 1
      correct[cat] += ok
    details.append({'question_id': pid, 'parsed': parsed, 'ground_truth': OPTIONS[problem['answer']],
                    'correct': bool(ok)})
  result = {
      'split': split,
      'accuracy': n_correct / len(pids) if pids else None,
      'correct': n_correct,
      'count': len(pids),
      'failed': failed,
      'missing': missing,
      'extra': len(set(predictions) - set(pids)),
      'categories': {cat: {'accuracy': correct[cat] / total[cat] if total[cat] else None,
                           'correct': correct[cat], 'count': total[cat]} for cat in CATEGORIES},
  }
  return result, details


def read_predictions(path):
  """Answers JSONL (`question_id`, `prompt`, `text` per line) -> ({question_id: text}, duplicate count)."""
  predictions, duplicates = {}, 0
  for line_no, record in predict.jsonl_records(path):
    try:
      qid, text = str(record['question_id']), record['text']
    except (KeyError, TypeError) as e:
      raise ValueError(f'{path}:{line_no}: not an answers record with question_id and text ({e!r})') from None
    duplicates += qid in predictions
    predictions[qid] = text  # the last answer wins, as in the original's dict
  return predictions, duplicates


# ----------------------------------------------------------------------------------------------- CLI

def _load_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    sys.exit(f'error: file not found: {path}')
  except json.JSONDecodeError as e:
    sys.exit(f'error: {path} is not valid JSON: {e}')


def _cmd_convert(args):
  problems = _load_json(args.problems)
  pid_splits = _load_json(os.path.join(os.path.dirname(os.path.abspath(args.problems)), 'pid_splits.json'))
  if args.image_folder is not None and not os.path.isdir(args.image_folder):
    sys.exit(f'error: image folder not found: {args.image_folder}')
  train, questions, stats = convert(problems, pid_splits, train_splits=args.train_splits.split(','),
                                    eval_split=args.eval_split, image_folder=args.image_folder,
                                    single_pred_prompt=args.single_pred_prompt)
  os.makedirs(args.out_dir, exist_ok=True)
  train_path = os.path.join(args.out_dir, f"scienceqa_{args.train_splits.replace(',', '_')}_QCM-LEA.json")
  with open(train_path, 'w') as f:
    json.dump(train, f, indent=1)
  questions_path = os.path.join(args.out_dir, f'scienceqa_{args.eval_split}_questions.jsonl')
  with open(questions_path, 'w') as f:
    for q in questions:
      f.write(json.dumps(q) + '\n')
  print(json.dumps({'train_file': train_path, 'train_records': len(train), 'questions_file': questions_path,
                    'questions': len(questions), 'per_split': stats}))
  skipped = {k: v for k, v in stats.items() if k.endswith('_missing_image')}
  if skipped:
    print(f'warning: skipped problems whose image is missing under {args.image_folder}: {skipped}',
          file=sys.stderr)


def _cmd_predict(args):
  mesh = None
  if args.mesh:
    from llava_jax import sharding
    mesh = sharding.make_mesh([int(x) for x in args.mesh.split(',')])
  predict.answer_questions(
      args.checkpoint, args.questions, args.image_folder, args.out, template=args.template,
      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
      seed=args.seed, model_id=args.model_id, image_aspect=args.image_aspect, mesh=mesh)


def _load_problems(path):
  return _load_json(path), _load_json(os.path.join(os.path.dirname(os.path.abspath(path)), 'pid_splits.json'))


def _read_answers(path, what):
  if not os.path.exists(path):
    sys.exit(f'error: {what} file not found: {path}')
  return read_predictions(path)[0]


def _cmd_judge(args):
  from llava_jax import api_client
  from llava_jax.eval import scienceqa_judge
  problems, pid_splits = _load_problems(args.problems)
  predictions = _read_answers(args.predictions, 'predictions')
  try:
    client = api_client.client_from_args(args)
    stats = scienceqa_judge.run_judge(client, problems, pid_splits, predictions, args.out_dir, split=args.split)
  except api_client.ApiError as e:
    sys.exit(f'error: {e}')
  print(json.dumps(stats))
  if stats['failed'] or stats['interrupted']:
    sys.exit(f'{stats["failed"]} requests failed (listed in {os.path.join(args.out_dir, scienceqa_judge.REJECTS)}); '
             'rerun the same command to ask them again')


def _cmd_score_requery(args, problems, pid_splits):
  from llava_jax.eval import scienceqa_judge
  if not (args.gpt4_result and args.requery_result):
    sys.exit('error: --gpt4-result and --requery-result go together')
  if not os.path.exists(args.gpt4_result):
    sys.exit(f'error: GPT-4 result file not found: {args.gpt4_result}')
  result, final = scienceqa_judge.score_requery(
      problems, pid_splits, _read_answers(args.predictions, 'predictions'),
      scienceqa_judge.read_gpt4_result(args.gpt4_result), _read_answers(args.requery_result, 'requery result'),
      seed=args.seed, split=args.split, ours_path=args.predictions, gpt4_path=args.gpt4_result)
  if args.output_result:
    with open(args.output_result, 'w') as f:
      json.dump(scienceqa_judge.original_output(result, final), f, indent=2)
  summary = scienceqa_judge.requery_summary(result)
  if summary:
    print(summary, file=sys.stderr)
  print(json.dumps(result))


def _cmd_score(args):
  problems, pid_splits = _load_problems(args.problems)
  if args.gpt4_result or args.requery_result:
    return _cmd_score_requery(args, problems, pid_splits)
  if not os.path.exists(args.predictions):
    sys.exit(f'error: predictions file not found: {args.predictions}')
  predictions, duplicates = read_predictions(args.predictions)
  result, details = score(problems, pid_splits, predictions, args.split)
  result['duplicates'] = duplicates
  if args.details:
    with open(args.details, 'w') as f:
      for d in details:
        f.write(json.dumps(d) + '\n')
  print(json.dumps(result))


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m llava_jax.eval.scienceqa', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)

  p = sub.add_parser('convert', help='official problems.json (+ pid_splits.json beside it) -> LLaVA JSON + '
                                     'question JSONL')
  p.add_argument('--problems', required=True, help='official problems.json; pid_splits.json is read beside it')
  p.add_argument('--image-folder', help='image root holding {split}/{pid}/image.png (or {pid}/image.png); '
                                        'problems whose image is missing are skipped and counted')
  p.add_argument('--out-dir', required=True)
  p.add_argument('--train-splits', default='train', help='comma-separated splits for the training JSON')
  p.add_argument('--eval-split', default='test', help='split for the question JSONL')
  p.add_argument('--single-pred-prompt', action='store_true',
                 help=f'LLaVA-1.5 eval: append "{SINGLE_PRED_PROMPT}" to each question')
  p.set_defaults(fn=_cmd_convert)

  p = sub.add_parser('predict', help='answer a question JSONL with a model (batched, resumable)')
  predict.add_answer_args(p)
  p.add_argument('--image-aspect', choices=('square', 'pad'),
                 help="image preprocessing (default: the checkpoint's, else square; LLaVA-1.5 uses pad)")
  p.add_argument('--mesh', help='data,fsdp,tensor mesh shape over all devices, e.g. -1,1,1 (batch must divide)')
  p.set_defaults(fn=_cmd_predict)

  p = sub.add_parser('score', help='accuracy of an answers JSONL, overall and by category')
  p.add_argument('--problems', required=True, help='official problems.json; pid_splits.json is read beside it')
  p.add_argument('--predictions', required=True, help='answers JSONL: question_id, prompt, text per line')
  p.add_argument('--split', default='test')
  p.add_argument('--details', help='optional JSONL of per-question parsed answers')
  g = p.add_argument_group('GPT-4 as the judge (eval_science_qa_gpt4_requery.py; files written by judge)')
  g.add_argument('--gpt4-result', help='{"outputs": {question_id: GPT-4 answer}} JSON')
  g.add_argument('--requery-result', help='re-query answers JSONL (question_id, text)')
  g.add_argument('--seed', type=int, default=0,
                 help='seed of the random option the original picks for an unparsable answer (default: %(default)s)')
  g.add_argument('--output-result', help="write the original's output JSON (acc, correct, count, results) here")
  p.set_defaults(fn=_cmd_score)

  p = sub.add_parser('judge', help="ask a judge model (GPT-4) for its answers and, where they differ from ours, "
                                   "for the final one (resumable)",
                     description='Writes the files `score --gpt4-result --requery-result` reads. Problems without '
                                 'a usable reply are listed in rejects.jsonl.')
  from llava_jax.eval import scienceqa_judge
  scienceqa_judge.judge_args(p)
  p.set_defaults(fn=_cmd_judge)

  args = parser.parse_args(argv)
  try:
    args.fn(args)
  except ValueError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  main()
