"""ChatClient / ResultStore / run_jobs against the fake chat server in chat_server.py."""
import email.utils
import json
import threading
import time

import pytest

from chat_server import ChatServer, last_user_message
from llava_jax import api_client
from llava_jax.api_client import ApiError, ChatClient, ClientConfig, Job, ResultStore

KEY = 'sk-test-SECRET-0123456789'


class Sleeper:
  """Records waits instead of sleeping (retry timing is asserted, not waited for)."""

  def __init__(self):
    self.waits = []

  def __call__(self, seconds):
    self.waits.append(seconds)


@pytest.fixture(scope='module')
def server():
  in_flight = {'now': 0, 'max': 0}
  cond = threading.Condition()

  def reply(request):
    prompt = last_user_message(request)
    if prompt.startswith('slowly'):  # for the concurrency test: hold requests until 3 overlap once
      with cond:
        in_flight['now'] += 1
        in_flight['max'] = max(in_flight['max'], in_flight['now'])
        cond.notify_all()
        cond.wait_for(lambda: in_flight['max'] >= 3, timeout=2.0)
      time.sleep(0.01)
      with cond:
        in_flight['now'] -= 1
    return f'echo: {prompt}'

  with ChatServer(reply, api_key=KEY) as s:
    s.in_flight = in_flight
    yield s


@pytest.fixture(autouse=True)
def fresh(server, monkeypatch):
  server.clear_faults()
  monkeypatch.setenv('TEST_CHAT_KEY', KEY)
  yield


def make_client(server, logs=None, **overrides):
  cfg = dict(base_url=server.base_url, model='judge-1', temperature=0.3, max_tokens=64,
             api_key_env='TEST_CHAT_KEY', concurrency=2, max_retries=3, timeout_s=5.0)
  cfg.update(overrides)
  sleeper = Sleeper()
  log = (logs.append if logs is not None else (lambda m: None))
  return ChatClient(ClientConfig(**cfg), sleep=sleeper, log=log), sleeper


def msgs(text):
  return [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': text}]


def test_success_sends_config_and_counts_usage(server):
  client, sleeper = make_client(server)
  n = len(server.requests)
  reply = client.complete(msgs('hello there world'))
  assert reply.text == 'echo: hello there world'
  assert reply.attempts == 1 and reply.finish_reason == 'stop'
  # usage from the server: prompt words 2 + 3 = 5, completion words 4
  assert reply.usage == {'prompt_tokens': 5, 'completion_tokens': 4, 'total_tokens': 9}
  assert client.usage == dict(requests=1, ok=1, retries=0, failed=0, prompt_tokens=5, completion_tokens=4,
                              total_tokens=9)
  body, headers = server.requests[n], server.headers[n]
  assert body['model'] == 'judge-1' and body['temperature'] == 0.3 and body['max_tokens'] == 64
  assert body['messages'] == msgs('hello there world')
  assert headers['Authorization'] == f'Bearer {KEY}'
  assert sleeper.waits == []


def test_retries_transient_failures_then_succeeds(server):
  logs = []
  client, sleeper = make_client(server, logs)
  server.add_fault('500', match='flaky')
  server.add_fault('badjson', match='flaky')
  server.add_fault('drop', match='flaky')
  reply = client.complete(msgs('flaky one'))
  assert reply.text == 'echo: flaky one' and reply.attempts == 4
  assert client.usage['requests'] == 4 and client.usage['retries'] == 3 and client.usage['ok'] == 1
  # the SDK's exponential backoff with jitter: retry k waits in [0.75 d, d], d = 0.5 s * 2**k
  assert len(sleeper.waits) == 3
  for k, w in enumerate(sleeper.waits):
    assert 0.75 * 0.5 * 2 ** k <= w <= 0.5 * 2 ** k
  assert sum('HTTP 500' in m for m in logs) == 1 and sum('malformed response' in m for m in logs) == 1


def test_429_honours_retry_after(server):
  client, sleeper = make_client(server)
  server.add_fault('429', match='limited', retry_after_ms=40)
  server.add_fault('429', match='limited', retry_after='2')
  date = email.utils.formatdate(time.time() + 30, usegmt=True)
  server.add_fault('429', match='limited', retry_after=date)
  reply = client.complete(msgs('limited'))
  assert reply.attempts == 4
  assert sleeper.waits[0] == pytest.approx(0.04) and sleeper.waits[1] == 2.0
  assert 27 <= sleeper.waits[2] <= 30


def test_timeout_is_retried(server):
  client, sleeper = make_client(server, timeout_s=1.0)
  server.add_fault('slow', match='sluggish', delay=3.0)
  t0 = time.time()
  reply = client.complete(msgs('sluggish'))
  assert reply.text == 'echo: sluggish' and reply.attempts == 2
  assert time.time() - t0 < 2.5  # the first attempt was abandoned at the timeout


def test_gives_up_and_non_retryable(server):
  client, sleeper = make_client(server, max_retries=2)
  server.add_fault('500', match='broken', times=None)
  with pytest.raises(ApiError, match='gave up after 3 attempts') as e:
    client.complete(msgs('broken'))
  assert e.value.status == 500 and len(sleeper.waits) == 2
  server.add_fault('status', match='bad request', status=400, text='context too long')
  with pytest.raises(ApiError, match='HTTP 400.*context too long') as e:
    client.complete(msgs('bad request'))
  assert not e.value.retryable and not e.value.fatal and len(sleeper.waits) == 2  # not retried
  assert client.usage['failed'] == 2 and client.usage['requests'] == 4


def test_key_never_leaks(server, monkeypatch):
  logs = []
  client, _ = make_client(server, logs)
  assert KEY not in repr(client)
  server.add_fault('status', match='echo key', status=400, text=f'invalid key {KEY}')
  with pytest.raises(ApiError) as e:
    client.complete(msgs('echo key'))
  assert KEY not in str(e.value) and '***' in str(e.value)
  server.add_fault('status', match='retry me', status=503, text=f'overloaded {KEY}')
  client.complete(msgs('retry me'))
  assert len(logs) == 1 and 'HTTP 503' in logs[0] and '***' in logs[0] and KEY not in logs[0]
  monkeypatch.setenv('TEST_CHAT_KEY', 'sk-wrong-key')
  wrong, _ = make_client(server)
  with pytest.raises(ApiError) as e:
    wrong.complete(msgs('x'))
  assert e.value.status == 401 and e.value.fatal and 'sk-wrong-key' not in str(e.value)
  monkeypatch.delenv('TEST_CHAT_KEY')
  with pytest.raises(ValueError, match='TEST_CHAT_KEY'):
    make_client(server)


def test_retry_after_headers(server):
  client, sleeper = make_client(server)
  server.add_fault('429', match='both', retry_after_ms=1500, retry_after='9')  # milliseconds win
  server.add_fault('429', match='both', retry_after='soon')  # unparsable: the backoff instead
  assert client.complete(msgs('both')).attempts == 3
  assert sleeper.waits[0] == 1.5 and 0.75 * 0.5 * 2 <= sleeper.waits[1] <= 0.5 * 2
  server.add_fault('429', match='patience', retry_after='300')  # over the SDK's 2 minutes: fail now
  with pytest.raises(ApiError, match=r"HTTP 429.*not retried: the server sent {'retry-after': '300'}") as e:
    client.complete(msgs('patience'))
  assert e.value.status == 429 and e.value.retryable and len(sleeper.waits) == 2


def test_store_last_wins_and_partial_line(tmp_path):
  path = str(tmp_path / 'sub' / 'store.jsonl')
  with ResultStore(path) as store:
    store.append({'key': 'a', 'v': 1})
    store.append({'key': 'b', 'v': 2})
    store.append({'key': 'a', 'v': 3})
  with open(path, 'a') as f:
    f.write('{"key": "c", "v"')  # killed mid-write
  store = ResultStore(path)
  assert store.dropped_partial == 1 and len(store) == 2
  assert store.get('a')['v'] == 3 and 'c' not in store
  store.append({'key': 'c', 'v': 4})
  store.close()
  with open(path) as f:
    lines = f.read().splitlines()
  assert [json.loads(line)['v'] for line in lines] == [1, 2, 3, 4]
  with open(path, 'a') as f:
    f.write('not json\n{"key": "d"}\n')
  with pytest.raises(ValueError, match='store.jsonl:5'):
    ResultStore(path)


def test_run_jobs_concurrency_skip_and_failures(server, tmp_path):
  client, _ = make_client(server, concurrency=3, max_retries=1)
  server.in_flight['max'] = 0
  server.add_fault('500', match='slowly 7', times=None)  # fails for good this run
  store = ResultStore(str(tmp_path / 'r.jsonl'))
  store.append({'key': 'k0', 'reply': 'old'})  # already done: skipped
  jobs = [Job(key=f'k{i}', messages=msgs(f'slowly {i}'), meta={'i': i}) for i in range(12)]
  stats = api_client.run_jobs(client, iter(jobs), store, progress_every=0)
  assert (stats.jobs, stats.skipped, stats.finished, stats.failed) == (12, 1, 10, 1)
  assert server.in_flight['max'] == 3
  assert store.get('k0')['reply'] == 'old' and 'k7' not in store
  assert store.get('k3') == {'key': 'k3', 'i': 3, 'reply': 'echo: slowly 3', 'finish_reason': 'stop',
                             'usage': {'prompt_tokens': 4, 'completion_tokens': 3, 'total_tokens': 7},
                             'attempts': 1}
  # a rerun asks only for what is not done; is_done can reject a stored record
  server.clear_faults()
  again = api_client.run_jobs(client, jobs, store, is_done=lambda r, j: r['reply'] != 'old', progress_every=0)
  assert (again.skipped, again.finished, again.failed) == (10, 2, 0)
  assert store.get('k0')['reply'] == 'echo: slowly 0' and 'k7' in store
  store.close()


def test_run_jobs_stops_on_fatal_status(server, tmp_path):
  client, _ = make_client(server, concurrency=1)
  server.add_fault('status', status=401, text='bad key', times=None)
  with ResultStore(str(tmp_path / 'r.jsonl')) as store:
    with pytest.raises(ApiError, match='HTTP 401'):
      api_client.run_jobs(client, [Job('a', msgs('a')), Job('b', msgs('b'))], store, progress_every=0)
    assert len(store) == 0
