"""Chat-completions client on the `openai` SDK, and a resumable JSONL result store.

Used by `llava_jax.datagen` (GPT-assisted instruction data) and `llava_jax.eval` (LLaVA-Bench judge).

- `ChatClient.complete(messages)` sends one request through `openai.OpenAI` against any OpenAI-compatible
  `base_url`. Retries, their backoff (0.5 s doubling to 8 s, jittered), `Retry-After` / `retry-after-ms`
  (honoured up to 2 minutes; a longer one is not retried) and timeouts are the SDK's. We add what it lacks:
  an HTTP 200 whose body is not a chat completion is retried like a dropped connection, every retry is
  logged with its cause, a concurrency limit is shared by all threads, and token usage is counted.
- The API key is read from an environment variable whose *name* is configured; the key is never
  printed, logged, or put into exception messages.
- `ResultStore` is an append-only JSONL file keyed by `record['key']` (last record wins); each record is
  flushed as it is written, so killing a run loses only the requests still in flight.
- `run_jobs` drives many requests through a client into a store, skipping keys already done.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
import urllib.parse
from typing import Callable, Iterable, Iterator, Optional

import httpx2
import openai

# Statuses the SDK retries (x-should-retry aside); ApiError.retryable says "trying again later can help".
RETRYABLE_STATUS = frozenset({408, 409, 429})
# Statuses that mean every further request fails the same way: stop the whole run.
FATAL_STATUS = frozenset({401, 403, 404})
# A server on this machine is never reached through an HTTP(S)_PROXY from the environment.
LOCAL_HOSTS = ('127.0.0.1', 'localhost', '::1')


def log_stderr(msg: str):
  print(msg, file=sys.stderr, flush=True)


class ApiError(Exception):
  """A request that failed; `retryable` says whether trying again can help."""

  def __init__(self, message: str, *, status: Optional[int] = None, retryable: bool = False):
    super().__init__(message)
    self.status = status
    self.retryable = retryable

  @property
  def fatal(self) -> bool:
    return self.status in FATAL_STATUS


@dataclasses.dataclass(frozen=True)
class ClientConfig:
  """Where and how to send chat-completion requests.

  base_url: e.g. 'https://api.openai.com/v1' (requests go to base_url + '/chat/completions'; a URL
    already ending in '/chat/completions' is used as is).
  api_key_env: name of the environment variable holding the key; None or '' sends no key (local servers).
  max_retries: extra attempts after the first one for retryable failures (the SDK's backoff between them).
  timeout_s: timeout of one attempt (connect, each read and write).
  """
  base_url: str
  model: str
  temperature: float = 0.2
  max_tokens: Optional[int] = None
  api_key_env: Optional[str] = 'OPENAI_API_KEY'
  concurrency: int = 4
  max_retries: int = 6
  timeout_s: float = 120.0

  def __post_init__(self):
    if not self.base_url.startswith(('http://', 'https://')):
      raise ValueError(f'base_url={self.base_url!r} must start with http:// or https://')
    if not self.model:
      raise ValueError('model must be a non-empty string')
    if self.concurrency < 1:
      raise ValueError(f'concurrency={self.concurrency} must be >= 1')
    if self.max_retries < 0:
      raise ValueError(f'max_retries={self.max_retries} must be >= 0')
    if self.timeout_s <= 0:
      raise ValueError(f'timeout_s={self.timeout_s} must be > 0')

  @property
  def endpoint(self) -> str:
    url = self.base_url.rstrip('/')
    return url if url.endswith('/chat/completions') else url + '/chat/completions'


@dataclasses.dataclass(frozen=True)
class ChatReply:
  text: str
  finish_reason: Optional[str]
  usage: dict  # prompt_tokens, completion_tokens, total_tokens (0 where the server sent none)
  attempts: int


class MalformedResponse(httpx2.DecodingError):
  """An HTTP 200 that is not a chat completion (a proxy's HTML page, truncated JSON).

  Raised inside the HTTP exchange, so the SDK retries it as it retries a dropped connection.
  """


def check_completion(response: httpx2.Response):
  """httpx response hook: reads the body (kept for error messages) and rejects a 200 without a reply text."""
  response.read()
  if response.status_code != 200:
    return
  try:
    text = json.loads(response.content)['choices'][0]['message']['content']
    if not isinstance(text, str):
      raise TypeError('message.content is not a string')
  except (ValueError, KeyError, IndexError, TypeError) as e:
    snippet = response.content[:120].decode('utf-8', 'replace')
    raise MalformedResponse(f'({e}): {snippet!r}', request=response.request) from None


class OpenAI(openai.OpenAI):  # the class name is the SDK's User-Agent
  """`openai.OpenAI` whose waits between retries go through `on_retry(error, wait, retry, max_retries)`.

  `_sleep_for_retry` is the one SDK internal we replace (openai is pinned): the wait stays the SDK's, but
  the caller logs why, counts it, and tests record it instead of sleeping.
  """

  def __init__(self, *, on_retry, **kwargs):
    super().__init__(**kwargs)
    self._on_retry = on_retry

  def _sleep_for_retry(self, *, retries_taken, max_retries, options, response):
    headers = response.headers if response is not None else None
    wait = self._calculate_retry_timeout(max_retries - retries_taken, options, headers)
    # The SDK calls this inside its `except` block, so exc_info is the failure being retried.
    self._on_retry(sys.exc_info()[1], wait, retries_taken + 1, max_retries)


class ChatClient:
  """Thread-safe chat-completions client. `usage` holds running totals over all calls."""

  def __init__(self, config: ClientConfig, *, sleep: Callable[[float], None] = time.sleep,
               log: Callable[[str], None] = log_stderr):
    self.config = config
    self._key = None
    if config.api_key_env:
      self._key = os.environ.get(config.api_key_env)
      if not self._key:
        raise ValueError(f'environment variable {config.api_key_env} (the API key) is not set; '
                         'set it, or pass an empty --api-key-env for a server without keys')
    self._sleep = sleep
    self._log = log
    self._slots = threading.BoundedSemaphore(config.concurrency)
    self._lock = threading.Lock()
    self._attempts = threading.local()  # attempts of the call running on this thread
    self._usage = dict(requests=0, ok=0, retries=0, failed=0,
                       prompt_tokens=0, completion_tokens=0, total_tokens=0)
    base_url = config.endpoint[:-len('/chat/completions')]
    http_client = openai.DefaultHttpxClient(
        trust_env=urllib.parse.urlsplit(base_url).hostname not in LOCAL_HOSTS,
        event_hooks={'request': [self._on_request], 'response': [check_completion]})
    # Without a key: api_key='' (None would read OPENAI_API_KEY), and `complete` omits the Authorization header.
    self._sdk = OpenAI(on_retry=self._on_retry, api_key=self._key or '', base_url=base_url,
                       timeout=config.timeout_s, max_retries=config.max_retries, http_client=http_client,
                       _enforce_credentials=bool(self._key))

  def __repr__(self):  # never show the key
    return f'ChatClient(endpoint={self.config.endpoint!r}, model={self.config.model!r})'

  @property
  def usage(self) -> dict:
    with self._lock:
      return dict(self._usage)

  def _count(self, **deltas):
    with self._lock:
      for k, v in deltas.items():
        self._usage[k] += v

  def _scrub(self, text: str) -> str:
    return text.replace(self._key, '***') if self._key else text

  def _on_request(self, request):
    self._count(requests=1)
    self._attempts.n += 1

  def _describe(self, failure) -> str:
    """One line naming why an attempt failed (an httpx response or exception), without the key."""
    endpoint = self.config.endpoint
    if isinstance(failure, httpx2.HTTPStatusError):
      failure = failure.response
    if isinstance(failure, httpx2.Response):
      text = f'HTTP {failure.status_code} from {endpoint}: {failure.text.strip()[:200]}'
    elif isinstance(failure, MalformedResponse):
      text = f'malformed response from {endpoint} {failure}'
    elif isinstance(failure, httpx2.TimeoutException):
      text = f'timeout after {self.config.timeout_s}s from {endpoint}'
    else:
      text = f'connection error to {endpoint}: {failure}'
    return self._scrub(text)

  def _on_retry(self, error, wait: float, retry: int, max_retries: int):
    self._count(retries=1)
    self._log(f'[api] {self._describe(error)}; retry {retry}/{max_retries} in {wait:.2f}s')
    self._sleep(wait)

  def complete(self, messages: list[dict], **params) -> ChatReply:
    """One chat completion, retried by the SDK on retryable failures.

    messages: [{'role': 'system'|'user'|'assistant', 'content': str}, ...].
    params: further `chat.completions.create` arguments (override model/temperature/max_tokens).
    Raises ApiError once retries are exhausted or on a non-retryable status.
    """
    request = {'model': self.config.model, 'messages': messages, 'temperature': self.config.temperature}
    if self.config.max_tokens is not None:
      request['max_tokens'] = self.config.max_tokens
    if not self._key:
      request['extra_headers'] = {'Authorization': openai.omit}
    request.update(params)
    self._attempts.n = 0
    try:
      with self._slots:  # held through the SDK's retry waits, so a throttled run does not add load
        completion = self._sdk.chat.completions.create(**request)
    except openai.APIStatusError as e:
      self._count(failed=1)
      raise self._error(e.response, e.status_code) from None
    except openai.APIConnectionError as e:  # timeouts, dropped connections, malformed replies
      self._count(failed=1)
      raise self._error(e.__cause__ or e, None) from None
    choice = completion.choices[0]
    usage = {k: int(getattr(completion.usage, k, 0) or 0)
             for k in ('prompt_tokens', 'completion_tokens', 'total_tokens')}
    self._count(ok=1, **usage)
    return ChatReply(text=choice.message.content, finish_reason=choice.finish_reason, usage=usage,
                     attempts=self._attempts.n)

  def _error(self, failure, status: Optional[int]) -> ApiError:
    """The ApiError of a call that failed for good; `failure` is the last httpx response or exception."""
    text = self._describe(failure)
    retryable = status is None or status in RETRYABLE_STATUS or status >= 500
    attempts = self._attempts.n
    if status is not None and retryable and attempts <= self.config.max_retries:  # the SDK declined
      asked = {h: failure.headers[h] for h in ('retry-after-ms', 'retry-after', 'x-should-retry')
               if h in failure.headers}
      text += f' (not retried: the server sent {asked}; the SDK waits at most 2 minutes)'
    elif retryable:
      text += f' (gave up after {attempts} attempts)'
    return ApiError(text, status=status, retryable=retryable)


# ---------------------------------------------------------------------------------------------------
# Resumable result store


class ResultStore:
  """Append-only JSONL file of records `{'key': str, ...}`; the last record of a key wins.

  A trailing partial line (a run killed mid-write) is cut off when the store is opened and counted in
  `dropped_partial`. Every `append` writes one whole line and flushes it.
  """

  def __init__(self, path: str, *, fsync: bool = False):
    self.path = path
    self._fsync = fsync
    self._lock = threading.Lock()
    self.records: dict[str, dict] = {}
    self.dropped_partial = 0
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path):
      self._load()
    self._file = open(path, 'a', encoding='utf-8')

  def _load(self):
    with open(self.path, 'rb') as f:
      data = f.read()
    end = data.rfind(b'\n') + 1
    if end < len(data):  # unfinished last line: that record was never completed
      self.dropped_partial = 1
      with open(self.path, 'r+b') as f:
        f.truncate(end)
    for lineno, line in enumerate(data[:end].splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        key = record['key']
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{self.path}:{lineno}: not a result record ({e})') from None
      self.records[str(key)] = record

  def __contains__(self, key: str) -> bool:
    return key in self.records

  def __len__(self) -> int:
    return len(self.records)

  def get(self, key: str, default=None):
    return self.records.get(key, default)

  def append(self, record: dict):
    line = json.dumps(record, ensure_ascii=False) + '\n'
    with self._lock:
      self._file.write(line)
      self._file.flush()
      if self._fsync:
        os.fsync(self._file.fileno())
      self.records[str(record['key'])] = record

  def close(self):
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------------------------------
# Running many requests


def request_fingerprint(model: str, messages: list) -> str:
  """A short hash of what a request asks: a stored reply whose fingerprint differs answers another question."""
  return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Job:
  """One request. `meta` is copied into the stored record next to the reply."""
  key: str
  messages: list
  meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunStats:
  jobs: int = 0       # jobs offered
  skipped: int = 0    # already done in the store
  finished: int = 0   # replies stored by this run
  failed: int = 0     # gave up after retries; not stored, a rerun tries again
  interrupted: bool = False
  errors: list = dataclasses.field(default_factory=list)  # first few failure messages


def run_jobs(client: ChatClient, jobs: Iterable[Job], store: ResultStore, *,
             is_done: Callable[[dict, Job], bool] = lambda record, job: True,
             postprocess: Callable[[dict], dict] = lambda record: record,
             progress_every: int = 50, log: Callable[[str], None] = log_stderr) -> RunStats:
  """Sends every job whose key is not done in `store`; stores `postprocess({key, **meta, reply, usage, ...})`.

  At most 2 * concurrency jobs are in flight, so `jobs` may be a lazy generator over a large dataset.
  A fatal status (401/403/404) stops the run and re-raises; other failures are counted and left for
  a rerun. Ctrl-C stops submitting, keeps what finished, and marks the stats interrupted.
  """
  stats = RunStats()
  start = time.time()
  max_in_flight = 2 * client.config.concurrency

  def call(job: Job) -> dict:
    reply = client.complete(job.messages)
    return postprocess({'key': job.key, **job.meta, 'reply': reply.text, 'finish_reason': reply.finish_reason,
                        'usage': reply.usage, 'attempts': reply.attempts})

  def pending() -> Iterator[Job]:
    for job in jobs:
      stats.jobs += 1
      record = store.get(job.key)
      if record is not None and is_done(record, job):
        stats.skipped += 1
        continue
      yield job

  def collect(done_futures):
    for future in done_futures:
      job = in_flight.pop(future)
      try:
        store.append(future.result())
        stats.finished += 1
      except ApiError as e:
        if e.fatal:
          raise
        stats.failed += 1
        if len(stats.errors) < 5:
          stats.errors.append(f'{job.key}: {e}')
        log(f'[api] {job.key} failed: {e}')
      n = stats.finished + stats.failed
      if progress_every and n % progress_every == 0:
        log(f'[api] {n} done ({stats.failed} failed, {stats.skipped} skipped) '
            f'in {time.time() - start:.1f}s; tokens {client.usage["total_tokens"]}')

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=client.config.concurrency)
  in_flight: dict = {}
  try:
    for job in pending():
      if len(in_flight) >= max_in_flight:
        done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
        collect(done)
      in_flight[pool.submit(call, job)] = job
    while in_flight:
      done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
      collect(done)
  except KeyboardInterrupt:
    stats.interrupted = True
    log('[api] interrupted: finished results are saved; rerun the same command to resume')
  finally:
    pool.shutdown(wait=not stats.interrupted, cancel_futures=True)
  return stats


# ---------------------------------------------------------------------------------------------------
# Command-line flags shared by datagen and eval


def add_client_args(parser: argparse.ArgumentParser, *, temperature: float, max_tokens: Optional[int]):
  g = parser.add_argument_group('chat-completions API')
  g.add_argument('--base-url', default='https://api.openai.com/v1',
                 help='OpenAI-compatible API root; requests go to BASE_URL/chat/completions (default: %(default)s)')
  g.add_argument('--model', default=None, help='model name sent in each request (required)')
  g.add_argument('--temperature', type=float, default=temperature, help='sampling temperature (default: %(default)s)')
  g.add_argument('--max-tokens', type=int, default=max_tokens, help='max reply tokens (default: %(default)s)')
  g.add_argument('--api-key-env', default='OPENAI_API_KEY',
                 help='NAME of the environment variable holding the API key (the key itself is never '
                      'printed); pass "" for servers without keys (default: %(default)s)')
  g.add_argument('--concurrency', type=int, default=4, help='requests in flight at once (default: %(default)s)')
  g.add_argument('--max-retries', type=int, default=6,
                 help='retries per request on 429/5xx/timeouts/dropped connections/malformed responses, with '
                      "the openai SDK's backoff and Retry-After (default: %(default)s)")
  g.add_argument('--timeout', type=float, default=120.0, help='per-request timeout in seconds (default: %(default)s)')


def client_from_args(args: argparse.Namespace, **kwargs) -> ChatClient:
  if not args.model:
    raise ValueError('--model is required to send requests')
  config = ClientConfig(base_url=args.base_url, model=args.model, temperature=args.temperature,
                        max_tokens=args.max_tokens, api_key_env=args.api_key_env or None,
                        concurrency=args.concurrency, max_retries=args.max_retries, timeout_s=args.timeout)
  return ChatClient(config, **kwargs)
