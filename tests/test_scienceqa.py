"""ScienceQA convert / parse / score on a hand-built fixture with known answers."""

import json
import os
import subprocess
import sys

import pytest

from llava_jax.eval import scienceqa


def _problem(subject, grade, answer, *, n_choices=3, hint='', image=None, split='test'):
  return {'question': 'Which one?', 'choices': [f'choice {i}' for i in range(n_choices)], 'answer': answer,
          'hint': hint, 'image': image, 'subject': subject, 'grade': grade, 'lecture': 'Lecture.',
          'solution': 'Solution.', 'split': split}


NAT, SOC, LAN = 'natural science', 'social science', 'language science'

# pid -> (problem, prediction text or None for "no prediction", expected parsed, expected correct)
CASES = {
    # rule 1: the whole answer is one option letter
    '1': (_problem(NAT, 'grade1', 1), 'B', 'B', True),
    '2': (_problem(NAT, 'grade2', 0, hint='A hint.'), 'C', 'C', False),
    # letter among A..E but beyond this problem's 3 choices: parsed, wrong, not FAILED
    '3': (_problem(SOC, 'grade7', 2, image='image.png'), 'E', 'E', False),
    # rule 2: starts with "X. " (wins over a later "The answer is")
    '4': (_problem(SOC, 'grade8', 0, hint='Hint.', image='image.png'), 'A. The answer is B.', 'A', True),
    # "C." is too short for rule 2 and has no "The answer is" -> FAILED
    '5': (_problem(LAN, 'grade3', 2), 'C.', scienceqa.FAILED, False),
    # leading space: not the whole answer, not "X. " -> FAILED
    '6': (_problem(LAN, 'grade12', 1), ' B', scienceqa.FAILED, False),
    # rule 3: exactly one "The answer is X." ('.' is any character in the original regex)
    '7': (_problem(NAT, 'grade10', 3, n_choices=4, image='image.png'),
          'Lecture text. Solution text. The answer is D.', 'D', True),
    '8': (_problem(NAT, 'grade5', 1, hint='Hint.'), 'So... The answer is B!', 'B', True),
    # two matches -> FAILED
    '9': (_problem(SOC, 'grade4', 0), 'The answer is A. No wait, The answer is B.', scienceqa.FAILED, False),
    # no trailing character after the letter -> FAILED
    '10': (_problem(LAN, 'grade9', 0, image='image.png'), 'The answer is A', scienceqa.FAILED, False),
    # lowercase letter -> FAILED
    '11': (_problem(NAT, 'grade6', 0), 'The answer is a.', scienceqa.FAILED, False),
    # no prediction at all -> FAILED (missing)
    '12': (_problem(SOC, 'grade11', 1, hint='Hint.'), None, scienceqa.FAILED, False),
    # two-choice problem, answered right with rule 3
    '13': (_problem(LAN, 'grade2', 1, n_choices=2), 'The answer is B.', 'B', True),
}
TRAIN = {'t1': _problem(NAT, 'grade3', 1, hint='Train hint.', image='image.png', split='train'),
         't2': _problem(SOC, 'grade9', 0, split='train'),
         't3': _problem(SOC, 'grade9', 0, image='missing.png', split='train')}
VAL = {'v1': _problem(LAN, 'grade1', 0, split='val')}

# Expected per category: (correct, count). Correct pids: 1, 4, 7, 8, 13.
EXPECTED = {
    'NAT': (3, 5),     # 1, 2, 7, 8, 11 -> 1, 7, 8 correct
    'SOC': (1, 4),     # 3, 4, 9, 12 -> 4
    'LAN': (1, 4),     # 5, 6, 10, 13 -> 13
    'TXT': (2, 4),     # hint: 2, 4, 8, 12 -> 4, 8
    'IMG': (2, 4),     # image: 3, 4, 7, 10 -> 4, 7
    'NO': (2, 6),      # neither: 1, 5, 6, 9, 11, 13 -> 1, 13
    'G1-6': (3, 7),    # grades 1,2,3,5,4,6,2: 1, 2, 5, 8, 9, 11, 13 -> 1, 8, 13
    'G7-12': (2, 6),   # 3, 4, 6, 7, 10, 12 -> 4, 7
}


@pytest.fixture(scope='module')
def sqa_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('sqa')
  problems = {pid: case[0] for pid, case in CASES.items()} | TRAIN | VAL
  (root / 'problems.json').write_text(json.dumps(problems))
  (root / 'pid_splits.json').write_text(json.dumps(
      {'train': list(TRAIN), 'val': list(VAL), 'test': list(CASES)}))
  for pid, problem in problems.items():
    if problem['image'] and problem['image'] != 'missing.png':
      folder = root / 'images' / problem['split'] / pid
      folder.mkdir(parents=True)
      (folder / problem['image']).write_bytes(b'png')
  with open(root / 'answers.jsonl', 'w') as f:
    for pid, (_, text, _, _) in CASES.items():
      if text is not None:
        f.write(json.dumps({'question_id': pid, 'prompt': 'p', 'text': text}) + '\n')
    f.write(json.dumps({'question_id': 't1', 'prompt': 'p', 'text': 'B'}) + '\n')  # not in the test split
  return root


def test_parse_answer_rules():
  for pid, (_, text, parsed, _) in CASES.items():
    if text is not None:
      assert scienceqa.parse_answer(text) == parsed, (pid, text)


def test_score_exact_numbers(sqa_dir):
  out = subprocess.run([sys.executable, '-m', 'llava_jax.eval.scienceqa', 'score',
                        '--problems', str(sqa_dir / 'problems.json'),
                        '--predictions', str(sqa_dir / 'answers.jsonl'),
                        '--details', str(sqa_dir / 'details.jsonl')],
                       capture_output=True, text=True, check=True)
  result = json.loads(out.stdout)  # exactly one JSON object
  assert result['count'] == 13 and result['correct'] == 5
  assert result['accuracy'] == pytest.approx(5 / 13)
  assert result['failed'] == 6 and result['missing'] == 1 and result['extra'] == 1
  assert result['duplicates'] == 0
  got = {cat: (v['correct'], v['count']) for cat, v in result['categories'].items()}
  assert got == EXPECTED
  for cat, (c, n) in EXPECTED.items():
    assert result['categories'][cat]['accuracy'] == pytest.approx(c / n)
  details = {d['question_id']: d for d in map(json.loads, open(sqa_dir / 'details.jsonl'))}
  for pid, (_, _, parsed, correct) in CASES.items():
    assert details[pid]['parsed'] == parsed and details[pid]['correct'] == correct, pid


def test_score_other_split_and_errors(sqa_dir):
  problems = json.loads((sqa_dir / 'problems.json').read_text())
  splits = json.loads((sqa_dir / 'pid_splits.json').read_text())
  result, _ = scienceqa.score(problems, splits, {'t1': 'B', 't2': 'The answer is B.', 't3': 'A'}, 'train')
  assert (result['correct'], result['count'], result['failed']) == (2, 3, 0)
  with pytest.raises(ValueError, match="no split 'minitest'"):
    scienceqa.score(problems, splits, {}, 'minitest')
  bad = sqa_dir / 'bad.jsonl'
  bad.write_text('{"question_id": "1"}\n')
  with pytest.raises(ValueError, match='bad.jsonl:1'):
    scienceqa.read_predictions(str(bad))


def test_convert(sqa_dir, tmp_path):
  out = subprocess.run([sys.executable, '-m', 'llava_jax.eval.scienceqa', 'convert',
                        '--problems', str(sqa_dir / 'problems.json'), '--image-folder', str(sqa_dir / 'images'),
                        '--out-dir', str(tmp_path), '--single-pred-prompt'],
                       capture_output=True, text=True, check=True)
  summary = json.loads(out.stdout)
  assert summary['train_records'] == 2 and summary['questions'] == 13
  assert summary['per_split']['train_missing_image'] == 1  # t3 skipped and counted
  assert 'missing' in out.stderr
  train = json.load(open(summary['train_file']))
  assert [r['id'] for r in train] == ['t1', 't2']
  assert train[0]['image'] == os.path.join('train', 't1', 'image.png')
  assert train[0]['conversations'] == [
      {'from': 'human', 'value': '<image>\nWhich one?\nContext: Train hint.\n'
                                 'Options: (A) choice 0 (B) choice 1 (C) choice 2'},
      {'from': 'gpt', 'value': 'Lecture. Solution. The answer is B.'}]
  assert 'image' not in train[1]
  assert train[1]['conversations'][0]['value'] == \
    'Which one?\nContext: N/A\nOptions: (A) choice 0 (B) choice 1 (C) choice 2'
  assert train[1]['conversations'][1]['value'] == 'Lecture. Solution. The answer is A.'
  questions = [json.loads(line) for line in open(summary['questions_file'])]
  assert [q['question_id'] for q in questions] == list(CASES)
  q7 = questions[6]
  assert q7['image'] == os.path.join('test', '7', 'image.png')
  assert q7['text'] == ('Which one?\nContext: N/A\nOptions: (A) choice 0 (B) choice 1 (C) choice 2 (D) choice 3\n'
                        + scienceqa.SINGLE_PRED_PROMPT)
  assert q7['category'] == 'NAT'
  assert 'image' not in questions[0]


def test_lea_with_empty_lecture():
  problem = _problem(NAT, 'grade1', 0) | {'lecture': '', 'solution': 'Because.'}
  assert scienceqa.build_answer(problem) == 'Because. The answer is A.'
