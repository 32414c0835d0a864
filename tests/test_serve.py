"""The OpenAI-compatible server, live on 127.0.0.1 (uvicorn in a thread, a tiny random model), driven by the
official `openai` client: streamed == non-streamed == Sampler (greedy), 64 concurrent requests == their serial
answers, >= 200 malformed requests answered 4xx while the server keeps serving, auth, 429, disconnects."""
import base64
import concurrent.futures
import io
import json
import os
import random
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from llava_jax import inference
from llava_jax.generate import SamplingParams
from llava_jax.serve import __main__ as serve_main
from llava_jax.serve.app import create_app, serve_in_thread
from test_predict import save_tiny_model, write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 12  # as test_predict / test_chat: the Sampler's compiled programs are shared through the cache
QUESTIONS = ('what is in the image ?', 'what is it ?', 'is it in the image ?', 'what ?')


class LiveServer:
  """uvicorn serving `app` on a free 127.0.0.1 port in a thread."""

  def __init__(self, app):
    self.server, self.url = serve_in_thread(app)

  def stop(self):
    self.server.should_exit = True


def data_url(path) -> str:
  return 'data:image/png;base64,' + base64.b64encode(open(path, 'rb').read()).decode()


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp('serve')
  save_tiny_model(root / 'model')
  (root / 'images').mkdir()
  for i in range(2):
    write_image(root / 'images' / f'{i}.png', i)
  (root / 'secret.png').write_bytes((root / 'images' / '0.png').read_bytes())
  os.symlink(root / 'secret.png', root / 'images' / 'link.png')
  args = serve_main.parse_args(['--checkpoint', str(root / 'model'), '--max-batch-size', '8', '--max-context', '96',
                                '--prompt-buckets', '64', '--prefill-sizes', '1,8', '--max-new-tokens', '24',
                                '--image-dir', str(root / 'images'), '--max-image-pixels', '40000', '--web'])
  app, engine = serve_main.build(args, log=lambda msg: None)
  engine.start()
  server = LiveServer(app)
  client = openai.OpenAI(base_url=server.url + '/v1', api_key='unused', max_retries=0)
  yield dict(root=root, engine=engine, server=server, client=client, url=server.url, im=engine.im)
  server.stop()
  engine.shutdown()


def messages(env, question, image=None):
  if image is None:
    return [{'role': 'user', 'content': question}]
  return [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': data_url(image)}},
                                       {'type': 'text', 'text': question}]}]


def ask(env, question, image=None, **kw):
  kw = {'temperature': 0, 'max_tokens': MAX_NEW, **kw}
  return env['client'].chat.completions.create(model='model', messages=messages(env, question, image), **kw)


def sampler_answer(env, question, image=None):
  im = env['im']
  value = ('<image>\n' + question) if image is not None else question
  ids = inference.prompt_ids(im, [{'from': 'human', 'value': value}])
  pixels = [inference.load_pixels(im, str(image))] if image is not None else [None]
  out = inference.generate_batch(im, [ids], pixels, max_new_tokens=MAX_NEW, sampling=SamplingParams())
  return out.texts[0], int(out.lengths[0]), len(ids), out.finish_reasons[0]


def stream_text(env, question, image=None, **kw):
  chunks = list(ask(env, question, image, stream=True, stream_options={'include_usage': True}, **kw))
  text = ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices)
  reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
  return text, reasons, chunks[-1].usage, len(chunks)


def test_health_and_models(env):
  assert httpx.get(env['url'] + '/health').json()['status'] == 'ok'
  assert [m.id for m in env['client'].models.list().data] == ['model']
  with pytest.raises(openai.NotFoundError) as e:
    env['client'].chat.completions.create(model='other', messages=[{'role': 'user', 'content': 'hi'}])
  assert "model 'other' does not exist" in e.value.body['message']


@pytest.mark.parametrize('with_image', [True, False])
def test_stream_equals_non_stream_equals_sampler(env, with_image):
  image = env['root'] / 'images' / '0.png' if with_image else None
  question = QUESTIONS[0] if with_image else QUESTIONS[1]
  expected, n_tokens, n_prompt, reason = sampler_answer(env, question, image)
  r = ask(env, question, image)
  assert r.choices[0].message.content == expected and r.choices[0].message.role == 'assistant'
  assert r.choices[0].finish_reason == ('length' if reason == 'length' else 'stop')
  assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_tokens)
  assert r.usage.total_tokens == n_prompt + n_tokens
  text, reasons, usage, n_chunks = stream_text(env, question, image)
  assert text == expected and reasons == [r.choices[0].finish_reason]
  assert (usage.prompt_tokens, usage.completion_tokens) == (n_prompt, n_tokens)
  assert n_chunks >= 4  # role chunk, several deltas, finish chunk, usage chunk: streamed, not one blob


def test_image_from_image_dir_and_system_prompt(env):
  image = env['root'] / 'images' / '1.png'
  by_data = ask(env, QUESTIONS[0], image).choices[0].message.content
  by_file = env['client'].chat.completions.create(model='model', temperature=0, max_tokens=MAX_NEW, messages=[
      {'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': f'file://{image}'}},
                                   {'type': 'text', 'text': QUESTIONS[0]}]}]).choices[0].message.content
  assert by_file == by_data == sampler_answer(env, QUESTIONS[0], image)[0]
  with_system = env['client'].chat.completions.create(model='model', temperature=0, max_tokens=MAX_NEW, messages=[
      {'role': 'system', 'content': 'what'}, {'role': 'user', 'content': QUESTIONS[1]}])
  assert with_system.usage.prompt_tokens < ask(env, QUESTIONS[1]).usage.prompt_tokens  # its own system prompt


def test_stop_and_sampling_seed(env):
  full = ask(env, QUESTIONS[1]).choices[0].message.content
  words = full.split()
  cut = ask(env, QUESTIONS[1], stop=[words[2]])
  assert cut.choices[0].finish_reason == 'stop' and full.startswith(cut.choices[0].message.content)
  assert words[2] not in cut.choices[0].message.content.split()
  a = [ask(env, QUESTIONS[1], temperature=1.0, seed=s).choices[0].message.content for s in (1, 1, 2)]
  assert a[0] == a[1] and a[0] != a[2] and a[0] != full


def test_64_concurrent_requests_equal_serial(env):
  image = env['root'] / 'images' / '0.png'
  cases = [(q, image if i % 2 else None, 0.0 if i % 3 else 1.0, i) for i, q in enumerate(QUESTIONS * 2)]
  serial = {c: ask(env, c[0], c[1], temperature=c[2], seed=c[3]).choices[0].message.content for c in cases}
  before = dict(env['engine'].stats)
  jobs = [cases[i % len(cases)] for i in range(64)]
  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    answers = list(pool.map(lambda c: ask(env, c[0], c[1], temperature=c[2], seed=c[3]).choices[0].message.content,
                            jobs))
  assert answers == [serial[c] for c in jobs]
  stats = env['engine'].stats
  assert stats['completed'] - before.get('completed', 0) == 64
  # Batched: 64 answers of <= 12 tokens in far fewer steps and prefills than one request at a time.
  assert stats['steps'] - before.get('steps', 0) < 64 * MAX_NEW / 3
  assert stats['prefills'] - before.get('prefills', 0) < 64


def _png(w, h) -> bytes:
  buf = io.BytesIO()
  Image.new('RGB', (w, h), (1, 2, 3)).save(buf, 'PNG')
  return buf.getvalue()


def malformed_requests(root):
  """(body bytes, substring the error must contain) for >= 200 bad requests."""
  ok = {'model': 'model', 'messages': [{'role': 'user', 'content': 'what ?'}]}
  raw = json.dumps(ok)
  img = lambda url: {**ok, 'messages': [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': url}},
                                                                    {'type': 'text', 'text': 'what ?'}]}]}
  b64 = lambda data: 'data:image/png;base64,' + base64.b64encode(data).decode()
  cases = [(raw[:i], 'not valid JSON') for i in range(1, len(raw) - 1, 2)]  # every truncation
  cases += [('', 'not valid JSON'), ('null', 'JSON object'), ('[1]', 'JSON object'), ('"x"', 'JSON object'),
            ('{"model": "model", "messages": [' * 50, 'not valid JSON'), ('\xff\xfe', 'not valid JSON')]
  wrong = {'model': [1, None, {}], 'messages': ['hi', [], {}, None, [1], [{'content': 'a'}]],
           'temperature': ['hot', -1, 3, None, [0]], 'top_p': [0, 1.5, 'x', -0.1],
           'max_tokens': [-1, 0, 10**9, 'a', 1.5],
           'max_completion_tokens': [-5, 25, 10**12], 'seed': ['s', 1.5, [1]], 'stop': [5, [1], ['a'] * 5, ['']],
           'n': [2, 0, 'one'], 'stream': ['yes', 1, {}], 'stream_options': ['x', {'include_usage': 'no'}]}
  for field, values in wrong.items():
    cases += [(json.dumps({**ok, field: v}), field) for v in values]
  msg = lambda m: json.dumps({**ok, 'messages': [m]})
  cases += [(msg({'role': r, 'content': 'a'}), 'role') for r in ('tool', 'bot', '', None, 5, 'USER')]
  cases += [(msg({'role': 'user', 'content': c}), 'content') for c in
            (5, [{'type': 'audio', 'audio': 'x'}], [{'type': 'text'}], [{'type': 'text', 'text': 5}], [{'text': 'a'}],
             [{'type': 'image_url'}], [{'type': 'image_url', 'image_url': {}}], [5], {'type': 'text', 'text': 'a'})]
  cases += [(msg({'role': 'user', 'content': 'look: <image>'}), '<image>'),
            (msg({'role': 'user', 'content': [{'type': 'text', 'text': '<im_patch> x'}]}), '<im_patch>'),
            (json.dumps({**ok, 'messages': [{'role': 'assistant', 'content': 'a'}]}), 'end with a user message'),
            (json.dumps({**ok, 'messages': ok['messages'] + [{'role': 'system', 'content': 'a'}]}), 'system'),
            (json.dumps({**ok, 'messages': [{'role': 'user', 'content': 'word ' * 200}]}), 'does not fit the context'),
            (json.dumps({**ok, 'model': 'gpt-4o'}), 'does not exist')]
  bad_urls = [('http://example.com/x.png', 'data: or file://'), ('ftp://x', 'data: or file://'), ('x.png', 'data:'),
              ('data:text/plain;base64,aGk=', 'data URL'), ('data:image/png,abc', 'data URL'),
              ('data:image/png;base64,@@@@', 'base64'), ('data:image/png;base64,', 'cannot be decoded'),
              (b64(b'not an image at all'), 'cannot be decoded'), (b64(_png(300, 300)), 'pixels'),
              (b64(_png(64, 64)[:45]), 'cannot be decoded'), ('data:image/png;base64,' + 'A' * (15 * 2**20), 'bytes'),
              ('file:///etc/passwd', 'inside --image-dir'), (f'file://{root}/secret.png', 'inside --image-dir'),
              (f'file://{root}/images/../secret.png', 'inside --image-dir'), ('file://link.png', 'inside --image-dir'),
              ('file://../secret.png', 'inside --image-dir'), (f'file://{root}/images/nope.png', 'inside --image-dir'),
              (f'file://{root}/images/%00.png', 'inside --image-dir'), (f'file://{root}/images', 'inside --image-dir')]
  cases += [(json.dumps(img(u)), want) for u, want in bad_urls]
  two = [{'type': 'image_url', 'image_url': {'url': b64(_png(8, 8))}}] * 2
  cases += [(json.dumps({**ok, 'messages': [{'role': 'user', 'content': two}]}), 'more than 1 image'),
            (json.dumps({**ok, 'messages': [{'role': 'assistant', 'content': two[:1]}, ok['messages'][0]]}),
             'only user messages')]
  rng = random.Random(0)
  while len(cases) < 220:  # random byte flips of a valid body
    b = bytearray(raw.encode())
    for _ in range(rng.randint(1, 4)):
      b[rng.randrange(len(b))] = rng.randrange(256)
    cases.append((bytes(b), None))
  return cases


def test_fuzz_malformed_requests_get_4xx_and_server_keeps_serving(env):
  cases = malformed_requests(env['root'])
  assert len(cases) >= 200
  expected = ask(env, QUESTIONS[1]).choices[0].message.content
  statuses = {}
  with httpx.Client(base_url=env['url'], timeout=30) as http:
    for body, want in cases:
      r = http.post('/v1/chat/completions', content=body, headers={'content-type': 'application/json'})
      if want is None and r.status_code == 200:  # a flip that kept the body valid
        continue
      assert 400 <= r.status_code < 500, (body[:200], r.status_code, r.text[:300])
      error = r.json()['error']
      assert error['type'] and error['message']
      if want is not None:
        assert want in error['message'] or want == error['param'], (body[:200], error)
      statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert http.get('/v1/nowhere').status_code == 404 and http.get('/v1/chat/completions').status_code == 405
  assert set(statuses) >= {400, 404, 413}
  assert ask(env, QUESTIONS[1]).choices[0].message.content == expected


def test_auth(env):
  server = LiveServer(create_app(env['engine'], model_name='model', api_key='s3cret'))
  try:
    client = openai.OpenAI(base_url=server.url + '/v1', api_key='s3cre', max_retries=0)
    with pytest.raises(openai.AuthenticationError):
      client.chat.completions.create(model='model', messages=[{'role': 'user', 'content': 'hi'}])
    with pytest.raises(openai.AuthenticationError):
      client.models.list()
    for headers in ({}, {'authorization': 'Basic s3cret'}, {'authorization': 'Bearer'}):
      r = httpx.post(server.url + '/v1/chat/completions', json={}, headers=headers)
      assert r.status_code == 401 and r.json()['error']['code'] == 'invalid_api_key'
    assert httpx.get(server.url + '/health').status_code == 200  # health stays open
    good = openai.OpenAI(base_url=server.url + '/v1', api_key='s3cret', max_retries=0)
    r = good.chat.completions.create(model='model', messages=[{'role': 'user', 'content': QUESTIONS[1]}],
                                     temperature=0, max_tokens=MAX_NEW)
    assert r.choices[0].message.content == ask(env, QUESTIONS[1]).choices[0].message.content
  finally:
    server.stop()


def test_queue_full_429_and_disconnect_frees_slot(env):
  engine = env['engine']
  engine.max_queue = 0
  try:
    with pytest.raises(openai.RateLimitError):
      ask(env, QUESTIONS[1])
  finally:
    engine.max_queue = 256
  cancelled = engine.stats['cancelled']
  body = {'model': 'model', 'messages': [{'role': 'user', 'content': 'what ?'}], 'max_tokens': 24, 'stream': True}
  with httpx.Client(base_url=env['url']) as http:
    for _ in range(5):
      resp = http.send(http.build_request('POST', '/v1/chat/completions', json=body), stream=True)
      next(resp.iter_lines())  # the role chunk: the request is queued
      with engine.lock:  # the engine loop waits at its next iteration: the request cannot finish meanwhile
        running = [q for q in [*engine.slots, *engine.waiting] if q is not None]
        resp.close()  # the client goes away
        for _ in range(200):
          if not running or running[0].cancelled:
            break
          time.sleep(0.02)
        # Still holding a slot or queued (it may have finished just before the engine stopped at the lock).
        running = [q for q in running if q in engine.slots or q in engine.waiting]
      if running:
        break
  assert running and running[0].cancelled
  for _ in range(200):
    if engine.stats['cancelled'] > cancelled and not any(engine.slots):
      break
    time.sleep(0.02)
  assert engine.stats['cancelled'] == cancelled + 1 and not any(engine.slots)
  assert ask(env, QUESTIONS[1]).choices[0].finish_reason in ('stop', 'length')


def test_web_chat_in_chromium(env):
  """Debian's headless Chromium (never a downloaded one) opens /web, uploads an image, asks, and watches the answer
  stream in; it equals the API's greedy answer for the same image and settings."""
  from playwright.sync_api import sync_playwright
  image = env['root'] / 'images' / '1.png'
  expected = ask(env, QUESTIONS[0], image).choices[0].message.content
  shot = Path(ROOT) / '.pytest_cache' / 'web_chat.png'  # kept after the run (pytest prunes old tmp dirs)
  shot.parent.mkdir(exist_ok=True)
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path='/usr/bin/chromium', headless=True, args=['--no-sandbox'])
    try:
      page = browser.new_page(viewport={'width': 1200, 'height': 800})
      page.goto(env['url'] + '/web/', wait_until='load')
      page.wait_for_selector('#question textarea', timeout=60_000)
      page.set_input_files('#image input[type=file]', str(image))
      page.wait_for_selector('#image img', timeout=30_000)
      for slider, value in (('#temperature', '0'), ('#max_tokens', str(MAX_NEW))):
        page.fill(f'{slider} input[type=number]', value)
        page.press(f'{slider} input[type=number]', 'Enter')
      # Every text the answer bubble shows, as the page renders it.
      page.evaluate("""() => { window.seen = [];
        new MutationObserver(() => { const b = document.querySelectorAll('#chat .message.bot');
          if (b.length) window.seen.push(b[b.length - 1].innerText.trim()); })
          .observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true}); }""")
      page.fill('#question textarea', QUESTIONS[0])
      page.press('#question textarea', 'Enter')
      page.wait_for_function("""want => { const b = document.querySelectorAll('#chat .message.bot');
        return b.length && b[b.length - 1].innerText.trim() === want; }""", arg=' '.join(expected.split()),
                             timeout=60_000)
      page.screenshot(path=str(shot), full_page=True)
      print(f'web chat screenshot: {shot}')
      want = ' '.join(expected.split())
      prefixes = [t for t in dict.fromkeys(page.evaluate('window.seen')) if t and want.startswith(t)]
      assert len(prefixes) >= 3 and prefixes[-1] == want, prefixes  # streamed: the answer grew in place
      assert page.inner_text('#chat .message.user').strip() == QUESTIONS[0]
      page.click('#reset')
      page.wait_for_function("() => !document.querySelector('#chat .message.bot')", timeout=30_000)
    finally:
      browser.close()
  assert shot.stat().st_size > 10_000
