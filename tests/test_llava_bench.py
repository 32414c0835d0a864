"""LLaVA-Bench review/summarize end to end against the fake judge server, score parsing, answer wiring."""
import json
import re
import sys
import types

import pytest

from chat_server import ChatServer, last_user_message
from conftest import write_jsonl
from llava_jax.eval import llava_bench

# question_id -> (category, image, [reference score, candidate score]); q6 has no candidate answer.
TABLE = {
    1: ('conv', '001.jpg', [8, 6]), 2: ('conv', 'COCO_1.jpg', [8, 8]), 3: ('detail', '001.jpg', [10, 5]),
    4: ('detail', 'COCO_1.jpg', [6, 7]), 5: ('complex', '001.jpg', [5, 5]), 6: ('complex', 'COCO_1.jpg', [9, 9]),
}
EXPECTED = {
    'conversation': {'relative': 7 / 8 * 100, 'candidate': 7.0, 'reference': 8.0, 'count': 2},
    'detail': {'relative': 75.0, 'candidate': 6.0, 'reference': 8.0, 'count': 2},
    'complex': {'relative': 100.0, 'candidate': 5.0, 'reference': 5.0, 'count': 1},
    'overall': {'relative': 31 / 37 * 100, 'candidate': 31 / 5, 'reference': 37 / 5, 'count': 5},
    'reviews': 5, 'unparsable': 0,
}


def judge(request):
  qid = int(re.search(r'question number (\d+)', last_user_message(request)).group(1))
  ref, cand = TABLE[qid][2]
  return f'{ref} {cand}\nAssistant 1 is {"better" if ref > cand else "as good"}.'


@pytest.fixture(scope='module')
def server():
  with ChatServer(judge) as s:
    yield s


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp('bench')
  questions = [{'question_id': q, 'image': img, 'text': f'What about question number {q}?', 'category': cat}
               for q, (cat, img, _) in TABLE.items()]
  contexts = [{'id': '001', 'image': '001.jpg', 'caption': 'A red bus on a bridge.'},
              {'id': 'COCO_1', 'image': 'COCO_1.jpg', 'captions': ['A man rides a horse.', 'A rider.'],
               'instances': [{'category': 'person', 'bbox': [0.1, 0.2, 0.5, 0.9]},
                             {'category': 'horse', 'bbox': [0.05, 0.4, 0.8, 1.0]}]}]
  reference = [{'question_id': q, 'text': f'reference answer {q}', 'answer_id': f'r{q}', 'model_id': 'gpt-4'}
               for q in TABLE]
  answers = [{'question_id': q, 'text': f'candidate answer {q}', 'answer_id': f'c{q}', 'model_id': 'ours'}
             for q in TABLE if q != 6]
  return dict(questions=write_jsonl(d / 'questions.jsonl', questions),
              context=write_jsonl(d / 'context.jsonl', contexts),
              reference=write_jsonl(d / 'answers_gpt4.jsonl', reference),
              answers=write_jsonl(d / 'answers.jsonl', answers), dir=d)


def review_args(server, files, out):
  return ['review', '--questions', files['questions'], '--context', files['context'], '--reference',
          files['reference'], '--answers', files['answers'], '--out', str(out), '--base-url', server.base_url,
          '--model', 'judge', '--api-key-env', '', '--concurrency', '3', '--max-retries', '1',
          '--timeout', '5']


def test_parse_scores():
  cases = {
      '8 7': [8.0, 7.0], '8, 7.5\nbecause': [8.0, 7.5], '\n\n 7 7 \nx': [7.0, 7.0], '9 6.': [9.0, 6.0],
      '**Assistant 1: 9** Assistant 2: 6': [9.0, 6.0], 'Scores: 8/10 and 6/10': [8.0, 6.0],
      '11 3': None, '8': None, '8 7 6': None, 'Assistant 1 is better.\n8 7': None, '': None, '0 5': None,
  }
  for reply, expected in cases.items():
    assert llava_bench.parse_scores(reply) == expected, reply


def test_context_and_messages():
  ctx = {'captions': ['A man rides a horse.', 'A rider.'],
         'instances': [{'category': 'person', 'bbox': [0.1, 0.2, 0.5, 0.9]}]}
  assert llava_bench.context_text(ctx) == 'A man rides a horse.\nA rider.\n\nperson: [0.100, 0.200, 0.500, 0.900]'
  assert llava_bench.context_text({'caption': 'A bus.'}) == 'A bus.'
  system, user = llava_bench.review_messages('CTX', 'Q?', 'REF', 'CAND')
  assert system['role'] == 'system' and user['role'] == 'user'
  c = user['content']
  assert c.index('[Context]\nCTX') < c.index('[Question]\nQ?') < c.index('[Assistant 1]\nREF') \
      < c.index('[Assistant 2]\nCAND') < c.index(llava_bench.JUDGE_INSTRUCTION)


def test_review_with_failures_then_rerun_and_summarize(server, files, tmp_path, capsys):
  out = tmp_path / 'reviews.jsonl'
  server.add_fault('500', match='question number 4', times=None)   # down for this run
  server.add_fault('garbage', match='question number 5', times=1)  # unparsable once
  server.add_fault('429', match='question number 1', times=1, retry_after_ms=5)
  n = len(server.requests)
  assert llava_bench.main(review_args(server, files, out)) == 1
  err = capsys.readouterr().err
  assert '1 questions have no answer; left out' in err
  assert 'stats: questions=6 reviewed=3 unparsable=1 pending=1 missing=1 skipped=0 requests=7' in err
  assert len(server.requests) - n == 7  # 5 questions + one 429 retry + one more 500
  coco_request = next(r for r in server.requests[n:] if 'question number 2' in last_user_message(r))
  prompt = last_user_message(coco_request)
  assert 'A man rides a horse.\nA rider.\n\nperson: [0.100, 0.200, 0.500, 0.900]\nhorse:' in prompt
  assert 'reference answer 2' in prompt and 'candidate answer 2' in prompt
  garbage = [json.loads(line) for line in out.read_text().splitlines() if '"question_id": 5' in line]
  assert len(garbage) == 1 and garbage[0]['tuple'] is None and garbage[0]['content'].startswith('@@')

  server.clear_faults()
  n = len(server.requests)
  assert llava_bench.main(review_args(server, files, out)) == 0
  assert 'reviewed=5 unparsable=0 pending=0 missing=1 skipped=3 requests=2' in capsys.readouterr().err
  assert len(server.requests) - n == 2  # only the failed and the unparsable one
  n = len(server.requests)
  assert llava_bench.main(review_args(server, files, out)) == 0
  assert len(server.requests) == n  # everything done

  rows = [json.loads(line) for line in out.read_text().splitlines()]
  latest = {r['question_id']: r for r in rows}
  assert latest[3]['tuple'] == [10.0, 5.0] and latest[3]['category'] == 'detail'
  assert (latest[3]['answer1_id'], latest[3]['answer2_id']) == ('r3', 'c3')
  assert llava_bench.main(['summarize', '--reviews', str(out)]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary.keys() == EXPECTED.keys()
  for key, expected in EXPECTED.items():
    assert summary[key] == (pytest.approx(expected, rel=1e-12) if isinstance(expected, dict) else expected), key
  assert summary['overall']['relative'] == pytest.approx(83.78378378378379, abs=1e-12)
  assert llava_bench.main(['summarize', '--reviews', str(out), '--questions', files['questions']]) == 0
  assert json.loads(capsys.readouterr().out)['missing'] == 1


def test_changed_answer_is_reviewed_again(server, files, tmp_path, capsys):
  out = tmp_path / 'reviews.jsonl'
  assert llava_bench.main(review_args(server, files, out)) == 0
  changed = dict(files)
  rows = [json.loads(line) for line in open(files['answers'])]
  rows[0]['text'] = 'a different candidate answer'
  changed['answers'] = write_jsonl(tmp_path / 'answers2.jsonl', rows)
  n = len(server.requests)
  assert llava_bench.main(review_args(server, changed, out)) == 0
  assert len(server.requests) - n == 1 and 'skipped=4' in capsys.readouterr().err


def test_summarize_numbers():
  reviews = [
      {'question_id': 1, 'category': 'conv', 'tuple': [4, 8]},
      {'question_id': 1, 'category': 'conv', 'tuple': [8, 2]},  # a rerun: the last record wins
      {'question_id': 2, 'category': 'conv', 'tuple': [6, 3]},
      {'question_id': 3, 'category': 'detail', 'tuple': None},
      {'question_id': 4, 'category': 'complex', 'tuple': [2, 3]},
  ]
  s = llava_bench.summarize(reviews)
  assert s['conversation'] == {'relative': 5 / 14 * 100, 'candidate': 2.5, 'reference': 7.0, 'count': 2}
  assert s['complex'] == {'relative': 150.0, 'candidate': 3.0, 'reference': 2.0, 'count': 1}
  assert 'detail' not in s
  assert s['overall'] == {'relative': 8 / 16 * 100, 'candidate': 8 / 3, 'reference': 16 / 3, 'count': 3}
  assert (s['reviews'], s['unparsable']) == (4, 1)
  assert llava_bench.summarize(reviews, question_ids=[1, 4, 9])['missing'] == 1


def test_fatal_judge_error_stops(server, files, tmp_path, capsys):
  server.add_fault('status', status=401, text='bad key', times=None)
  try:
    assert llava_bench.main(review_args(server, files, tmp_path / 'r.jsonl')) == 2
  finally:
    server.clear_faults()
  assert 'HTTP 401' in capsys.readouterr().err and (tmp_path / 'r.jsonl').read_text() == ''


def test_answer_calls_predict(monkeypatch, tmp_path, files, capsys):
  calls = []
  fake = types.ModuleType('llava_jax.eval.predict')
  fake.answer_questions = lambda *a, **kw: calls.append((a, kw)) or {'questions': 6, 'answered': 6}
  monkeypatch.setitem(sys.modules, 'llava_jax.eval.predict', fake)
  import llava_jax.eval
  monkeypatch.setattr(llava_jax.eval, 'predict', fake, raising=False)
  rc = llava_bench.main(['answer', '--checkpoint', 'ckpt', '--questions', files['questions'], '--image-folder',
                         'imgs', '--out', str(tmp_path / 'a.jsonl'), '--batch-size', '2', '--model-id', 'ours'])
  assert rc == 0 and '"answered": 6' in capsys.readouterr().err
  assert calls == [(('ckpt', files['questions'], 'imgs', str(tmp_path / 'a.jsonl')),
                    dict(template=None, batch_size=2, max_new_tokens=1024, temperature=0.0, seed=0,
                         model_id='ours'))]
