"""ScienceQA with GPT-4 as the judge: `score --gpt4-result --requery-result` against the original
`eval_science_qa_gpt4_requery.py` (run as its command line does) on a fixture covering each of its branches, and
`judge` end to end against the fake chat server (resumable, rejects file, key from the environment)."""
import json
import re

import pytest

import llava_original as original
from chat_server import ChatServer, last_user_message
from conftest import write_jsonl
from llava_jax.eval import scienceqa, scienceqa_judge


def _problem(answer, n_choices=3):
  return {'question': 'Which one?', 'choices': [f'choice {i}' for i in range(n_choices)], 'answer': answer,
          'hint': '', 'image': None, 'subject': 'natural science', 'grade': 'grade3', 'lecture': '', 'solution': ''}


A = lambda letter: f'Reasoning. The answer is {letter}.'
# pid -> (n choices, answer index, ours, GPT-4's, re-query or None for "not re-queried").
CASES = {
    'p1': (3, 0, A('A'), A('A'), None),                      # agree, right; no re-query: ours stands
    'p2': (3, 1, A('A'), A('B'), A('B')),                    # GPT-4 right, re-query takes it
    'p3': (3, 2, A('C'), A('A'), A('A')),                    # re-query wrong (the original prints it)
    'p4': (2, 1, 'No letter here.', A('B'), 'unsure'),       # ours FAILED -> random; re-query FAILED -> ours
    'p5': (2, 0, A('A') + ' ' + A('B'), 'I cannot tell.', None),  # both FAILED (two matches / none): random
    'p6': (2, 1, A('B'), 'The answer is B', A('B')),         # GPT-4 FAILED ("." needs a character): ours stands in
    'p7': (3, 0, A('A'), A('E'), A('A')),                    # GPT-4 letter beyond the choices: random, not FAILED
    'p8': (3, 2, A('D'), A('C'), A('C')),                    # ours beyond the choices: random
    'p9': (2, 0, A('B'), A('A'), A('D')),                    # re-query beyond the choices: random re-query option
    'p10': (4, 3, A('A'), A('B'), 'So... The answer is D!'),  # both wrong, re-query right ('.' is any character)
    'p11': (2, 0, 'x', 'y', None),                           # both FAILED, never re-queried
    'p12': (2, 1, 'x', 'The answer is a.', A('B')),          # lowercase letter: FAILED
}
NAMES = {'Our-Correct': 'ours', 'GPT-4-Correct': 'gpt4', 'GPT-4-OursVisual-Correct': 'gpt4_ourvisual',
         'Requery-Correct': 'requery', 'Correct upper': 'upper_bound'}


@pytest.fixture(scope='module')
def sqa(tmp_path_factory):
  d = tmp_path_factory.mktemp('sqa')
  problems = {pid: _problem(answer, n) for pid, (n, answer, *_) in CASES.items()}
  problems['t1'] = _problem(0)  # a train problem: not scored
  (d / 'problems.json').write_text(json.dumps(problems))
  (d / 'pid_splits.json').write_text(json.dumps({'test': list(CASES), 'train': ['t1']}))
  ours = write_jsonl(d / 'ours.jsonl', [{'question_id': p, 'prompt': f'Q {p}', 'text': c[2]} for p, c in CASES.items()])
  (d / 'gpt4.json').write_text(json.dumps({'outputs': {p: c[3] for p, c in CASES.items()}}))
  requery = write_jsonl(d / 'requery.jsonl', [{'question_id': p, 'text': c[4]} for p, c in CASES.items() if c[4]])
  return dict(dir=d, problems=str(d / 'problems.json'), ours=ours, gpt4=str(d / 'gpt4.json'), requery=requery,
              problem_dict=problems)


def _original_counts(printed: str) -> dict:
  counts = {}
  for name, n in re.findall(r'Total: \d+, (.+?): (\d+), (?:Accuracy|Percentage)', printed):
    counts[NAMES.get(name, 'gpt4_failed')] = int(n)
  return counts


def _score(sqa, seed, out, capsys, gpt4=None, requery=None):
  scienceqa.main(['score', '--problems', sqa['problems'], '--predictions', sqa['ours'], '--gpt4-result',
                  gpt4 or sqa['gpt4'], '--requery-result', requery or sqa['requery'], '--seed', str(seed),
                  '--output-result', str(out)])
  return json.loads(capsys.readouterr().out)


def test_score_equals_the_original_script(sqa, tmp_path, capsys):
  random_picks = set()
  for seed in range(6):  # the random options land right and wrong across seeds
    printed = original.requery_score(str(sqa['dir']), sqa['ours'], sqa['gpt4'], sqa['requery'],
                                     str(tmp_path / 'theirs.json'), seed)
    ours = _score(sqa, seed, tmp_path / 'ours.json', capsys)
    theirs = _original_counts(printed)
    assert len(theirs) == 6
    assert {k: (ours[k]['correct'] if isinstance(ours[k], dict) else ours[k]) for k in theirs} == theirs, seed
    assert json.loads((tmp_path / 'ours.json').read_text()) == json.loads((tmp_path / 'theirs.json').read_text())
    assert ours['count'] == 12 and ours['missing_requery'] == 3 and ours['gpt4_failed'] == 4
    assert ours['accuracy'] == ours['requery']['correct'] / 12
    random_picks.add(ours['random_picks'])
  # One draw per unparsable, out-of-range or missing answer: p1 1, p4 2, p5 3, p6 1, p7 1, p8 1, p9 1, p11 3, p12 2.
  assert random_picks == {15}


def test_score_fixed_numbers_and_bad_input(sqa, tmp_path, capsys):
  # Without any unparsable answer the numbers do not depend on the seed: check them by hand.
  clean = {p: c for p, c in CASES.items() if p in ('p1', 'p2', 'p3', 'p10')}
  problems = {p: sqa['problem_dict'][p] for p in clean}
  result, final = scienceqa_judge.score_requery(
      problems, {'test': list(clean)}, {p: c[2] for p, c in clean.items()}, {p: c[3] for p, c in clean.items()},
      {p: c[4] for p, c in clean.items() if c[4]}, seed=0)
  assert final == {'p1': 0, 'p2': 1, 'p3': 0, 'p10': 3}
  assert (result['ours']['correct'], result['gpt4']['correct'], result['requery']['correct'],
          result['upper_bound']['correct'], result['random_picks']) == (2, 2, 3, 3, 1)  # p1's missing re-query
  # Missing GPT-4 answer: the error names the file and the problem.
  gpt4 = tmp_path / 'gpt4.json'
  gpt4.write_text(json.dumps({'outputs': {p: c[3] for p, c in CASES.items() if p != 'p7'}}))
  with pytest.raises(SystemExit, match=rf"{re.escape(str(gpt4))}: no GPT-4 answer for 1 problems.*p7"):
    _score(sqa, 0, tmp_path / 'o.json', capsys, gpt4=str(gpt4))
  gpt4.write_text(json.dumps({'p1': 'x'}))
  with pytest.raises(SystemExit, match='expected {"outputs"'):
    _score(sqa, 0, tmp_path / 'o.json', capsys, gpt4=str(gpt4))
  with pytest.raises(SystemExit, match='go together'):
    scienceqa.main(['score', '--problems', sqa['problems'], '--predictions', sqa['ours'], '--gpt4-result', 'x'])


# ---------------------------------------------------------------------------------------------------- judge

JUDGE = {  # pid -> (GPT-4's own answer, re-query answer)
    'p1': (A('A'), A('A')), 'p2': (A('B'), A('B')), 'p3': (A('A'), A('A')), 'p4': (A('B'), 'unsure'),
    'p5': ('I cannot tell.', A('A')), 'p6': (A('B'), A('B')), 'p7': (A('E'), A('A')), 'p8': (A('C'), A('C')),
    'p9': (A('A'), A('D')), 'p10': (A('B'), A('D')), 'p11': (A('A'), A('A')), 'p12': (A('B'), A('B')),
}


def judge_reply(request):
  system, user = request['messages'][0]['content'], last_user_message(request)
  pid = re.search(r'Which one\? \((p\d+)\)', user).group(1)
  return JUDGE[pid][system == scienceqa_judge.REQUERY_SYSTEM]


@pytest.fixture()
def judge_inputs(sqa, tmp_path):
  # Questions that name their pid, so the fake judge knows which one it is asked.
  problems = {pid: dict(p, question=f'Which one? ({pid})') for pid, p in sqa['problem_dict'].items()}
  (tmp_path / 'problems.json').write_text(json.dumps(problems))
  (tmp_path / 'pid_splits.json').write_text(json.dumps({'test': list(CASES)}))
  return str(tmp_path / 'problems.json'), tmp_path / 'judge'


def _judge(server, problems, ours, out_dir):
  return ['judge', '--problems', problems, '--predictions', ours, '--out-dir', str(out_dir), '--base-url',
          server.base_url, '--model', 'gpt-4', '--api-key-env', 'SQA_JUDGE_KEY', '--max-retries', '0',
          '--concurrency', '3', '--timeout', '5']


def test_judge_against_fake_server_resumes_and_scores(sqa, judge_inputs, monkeypatch, capsys, tmp_path):
  problems, out_dir = judge_inputs
  monkeypatch.delenv('SQA_JUDGE_KEY', raising=False)
  with ChatServer(judge_reply, api_key='sekret-key') as server:
    with pytest.raises(SystemExit, match='SQA_JUDGE_KEY'):  # no key in the environment
      scienceqa.main(_judge(server, problems, sqa['ours'], out_dir))
    monkeypatch.setenv('SQA_JUDGE_KEY', 'sekret-key')
    server.add_fault('status', match='(p3)', times=None, status=400, text='content policy')  # p3 fails this run
    with pytest.raises(SystemExit, match='1 requests failed'):
      scienceqa.main(_judge(server, problems, sqa['ours'], out_dir))
    stats = json.loads(capsys.readouterr().out)
    # Re-queried where the letters differ or one does not parse: p2, p4, p5, p7-p12; p1 and p6 agree, p3 unanswered.
    assert stats == dict(problems=12, asked=12, gpt4_answers=11, disagree=9, requeries=9, failed=1, unparsable=2,
                         skipped=0, requests=21, interrupted=False)
    rejects = [json.loads(line) for line in (out_dir / 'rejects.jsonl').read_text().splitlines()]
    assert [(r['question_id'], r['stage'], r['reason'].split()[0]) for r in rejects] == [
        ('p3', 'gpt4', 'no'), ('p5', 'gpt4', 'unparsable'), ('p4', 'requery', 'unparsable')]
    assert all('sekret' not in line for line in (out_dir / 'gpt4_answers.jsonl').read_text().splitlines())
    requery_prompt = next(last_user_message(r) for r in server.requests
                          if r['messages'][0]['content'] == scienceqa_judge.REQUERY_SYSTEM and '(p2)' in str(r))
    assert requery_prompt.index('Options: (A) choice 0') < requery_prompt.index(
        '[Assistant 1]\n' + CASES['p2'][2]) < requery_prompt.index('[Assistant 2]\n' + JUDGE['p2'][0])

    server.clear_faults()
    n = len(server.requests)
    scienceqa.main(_judge(server, problems, sqa['ours'], out_dir))  # rerun: only p3, then its re-query
    stats = json.loads(capsys.readouterr().out)
    assert len(server.requests) - n == 2 and stats['skipped'] == 20 and stats['failed'] == 0
    assert stats['gpt4_answers'] == 12 and stats['requeries'] == 10
    n = len(server.requests)
    scienceqa.main(_judge(server, problems, sqa['ours'], out_dir))
    assert len(server.requests) == n  # all done
    capsys.readouterr()

    # A changed answer of ours changes its re-query request: asked again, nothing else.
    changed = write_jsonl(tmp_path / 'ours2.jsonl', [{'question_id': p, 'prompt': '', 'text': A('C') if p == 'p9' else c[2]}
                                                 for p, c in CASES.items()])
    scienceqa.main(_judge(server, problems, changed, out_dir))
    assert len(server.requests) - n == 1 and '(p9)' in last_user_message(server.requests[-1])
    capsys.readouterr()
    scienceqa.main(_judge(server, problems, sqa['ours'], out_dir))  # and back
    capsys.readouterr()

  # The files it wrote are the original scorer's inputs: both score them alike.
  gpt4, requery = str(out_dir / 'gpt4_result.json'), str(out_dir / 'requery_result.jsonl')
  assert json.loads(open(gpt4).read())['outputs'] == {p: j[0] for p, j in JUDGE.items()}
  (out_dir.parent / 'pid_splits.json').write_text(json.dumps({'test': list(CASES)}))
  for seed in (0, 1):
    printed = original.requery_score(str(out_dir.parent), sqa['ours'], gpt4, requery, str(tmp_path / 't.json'), seed)
    ours = _score(dict(sqa, problems=problems), seed, tmp_path / 'o.json', capsys, gpt4=gpt4, requery=requery)
    assert {k: (ours[k]['correct'] if isinstance(ours[k], dict) else ours[k])
            for k in _original_counts(printed)} == _original_counts(printed)
    assert ours['missing_requery'] == 2  # p1, p6: agreed, never re-queried
