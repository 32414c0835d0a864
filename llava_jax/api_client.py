"""OpenAI-compatible chat-completions client (stdlib only) and a resumable JSONL result store.

Used by `llava_jax.datagen` (GPT-assisted instruction data) and `llava_jax.eval` (LLaVA-Bench judge).

- `ChatClient.complete(messages)` POSTs to `{base_url}/chat/completions` with retries (exponential
  backoff with jitter), honours `Retry-After` / `retry-after-ms` on 429, a per-request socket timeout,
  a concurrency limit shared by all threads, and counts token usage.
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
import email.utils
import http.client
import json
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Iterable, Iterator, Optional

# Statuses worth retrying: timeouts, conflicts, rate limits and server-side failures.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
# Statuses that mean every further request fails the same way: stop the whole run.
FATAL_STATUS = frozenset({401, 403, 404})


def log_stderr(msg: str):
  print(msg, file=sys.stderr, flush=True)


class ApiError(Exception):
  """A request that failed; `retryable` says whether trying again can help."""

  def __init__(self, message: str, *, status: Optional[int] = None, retryable: bool = False,
               retry_after: Optional[float] = None):
    super().__init__(message)
    self.status = status
    self.retryable = retryable
    self.retry_after = retry_after

  @property
  def fatal(self) -> bool:
    return self.status in FATAL_STATUS


@dataclasses.dataclass(frozen=True)
class ClientConfig:
  """Where and how to send chat-completion requests.

  base_url: e.g. 'https://api.openai.com/v1' (requests go to base_url + '/chat/completions'; a URL
    already ending in '/chat/completions' is used as is).
  api_key_env: name of the environment variable holding the key; None or '' sends no key (local servers).
  max_retries: extra attempts after the first one for retryable failures.
  backoff_s / max_backoff_s: attempt k waits uniform(d/2, d) with d = min(max_backoff_s, backoff_s * 2**k).
  timeout_s: socket timeout of one attempt (connect and each read).
  """
  base_url: str
  model: str
  temperature: float = 0.2
  max_tokens: Optional[int] = None
  api_key_env: Optional[str] = 'OPENAI_API_KEY'
  concurrency: int = 4
  max_retries: int = 6
  backoff_s: float = 1.0
  max_backoff_s: float = 60.0
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


def parse_retry_after(headers) -> Optional[float]:
  """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date); None if absent."""
  ms = headers.get('retry-after-ms')
  if ms is not None:
    try:
      return max(0.0, float(ms) / 1000.0)
    except ValueError:
      pass
  value = headers.get('Retry-After')
  if value is None:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())


class ChatClient:
  """Thread-safe chat-completions client. `usage` holds running totals over all calls."""

  def __init__(self, config: ClientConfig, *, sleep: Callable[[float], None] = time.sleep,
               seed: Optional[int] = None, log: Callable[[str], None] = log_stderr):
    self.config = config
    self._key = None
    if config.api_key_env:
      self._key = os.environ.get(config.api_key_env)
      if not self._key:
        raise ValueError(f'environment variable {config.api_key_env} (the API key) is not set; '
                         'set it, or pass an empty --api-key-env for a server without keys')
    self._sleep = sleep
    self._rng = random.Random(seed)
    self._log = log
    self._slots = threading.BoundedSemaphore(config.concurrency)
    host = urllib.parse.urlsplit(config.endpoint).hostname
    # A server on this machine is never reached through an HTTP(S)_PROXY from the environment.
    handlers = [urllib.request.ProxyHandler({})] if host in ('127.0.0.1', 'localhost', '::1') else []
    self._opener = urllib.request.build_opener(*handlers)
    self._lock = threading.Lock()
    self._usage = dict(requests=0, ok=0, retries=0, failed=0,
                       prompt_tokens=0, completion_tokens=0, total_tokens=0)

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

  def backoff(self, attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (0-based), with jitter."""
    d = min(self.config.max_backoff_s, self.config.backoff_s * (2 ** attempt))
    with self._lock:
      return d / 2 + self._rng.uniform(0, d / 2)

  def complete(self, messages: list[dict], **params) -> ChatReply:
    """One chat completion, retried on retryable failures.

    messages: [{'role': 'system'|'user'|'assistant', 'content': str}, ...].
    params: extra request fields (override model/temperature/max_tokens from the config).
    Raises ApiError once retries are exhausted or on a non-retryable status.
    """
    body = {'model': self.config.model, 'messages': messages, 'temperature': self.config.temperature}
    if self.config.max_tokens is not None:
      body['max_tokens'] = self.config.max_tokens
    body.update(params)
    data = json.dumps(body).encode('utf-8')
    attempt = 0
    while True:
      try:
        with self._slots:
          self._count(requests=1)
          reply = self._post(data)
        reply = dataclasses.replace(reply, attempts=attempt + 1)
        self._count(ok=1, **reply.usage)
        return reply
      except ApiError as e:
        if not e.retryable or attempt >= self.config.max_retries:
          self._count(failed=1)
          if e.retryable:
            raise ApiError(f'{e} (gave up after {attempt + 1} attempts)', status=e.status) from None
          raise
        wait = self.backoff(attempt)
        if e.retry_after is not None:  # the server knows best when capacity returns
          wait = max(wait, e.retry_after) if e.status != 429 else e.retry_after
        self._count(retries=1)
        self._log(f'[api] {e}; retry {attempt + 1}/{self.config.max_retries} in {wait:.2f}s')
        self._sleep(wait)
        attempt += 1

  def _post(self, data: bytes) -> ChatReply:
    headers = {'Content-Type': 'application/json', 'Accept': 'application/json'}
    if self._key:
      headers['Authorization'] = f'Bearer {self._key}'
    request = urllib.request.Request(self.config.endpoint, data=data, headers=headers, method='POST')
    try:
      with self._opener.open(request, timeout=self.config.timeout_s) as response:
        raw = response.read()
    except urllib.error.HTTPError as e:
      status = e.code
      try:
        detail = e.read(300).decode('utf-8', 'replace')
      except Exception:  # the body is only for the message
        detail = ''
      retryable = status in RETRYABLE_STATUS or status >= 500
      retry_after = parse_retry_after(e.headers) if e.headers is not None else None
      raise ApiError(self._scrub(f'HTTP {status} from {self.config.endpoint}: {detail.strip()[:200]}'),
                     status=status, retryable=retryable, retry_after=retry_after) from None
    except (socket.timeout, TimeoutError):
      raise ApiError(f'timeout after {self.config.timeout_s}s from {self.config.endpoint}',
                     retryable=True) from None
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError) as e:
      reason = getattr(e, 'reason', e)
      raise ApiError(self._scrub(f'connection error to {self.config.endpoint}: {reason}'),
                     retryable=True) from None
    return self._parse(raw)

  def _parse(self, raw: bytes) -> ChatReply:
    try:
      payload = json.loads(raw)
      choice = payload['choices'][0]
      text = choice['message']['content']
      if not isinstance(text, str):
        raise TypeError('message.content is not a string')
    except (ValueError, KeyError, IndexError, TypeError) as e:
      snippet = raw[:120].decode('utf-8', 'replace')
      raise ApiError(self._scrub(f'malformed response from {self.config.endpoint} ({e}): {snippet!r}'),
                     retryable=True) from None
    usage = payload.get('usage') or {}
    usage = {k: int(usage.get(k) or 0) for k in ('prompt_tokens', 'completion_tokens', 'total_tokens')}
    return ChatReply(text=text, finish_reason=choice.get('finish_reason'), usage=usage, attempts=1)


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
                 help='retries per request on 429/5xx/timeouts/malformed responses (default: %(default)s)')
  g.add_argument('--backoff', type=float, default=1.0,
                 help='base of the exponential backoff in seconds; jittered, capped at 60 s (default: %(default)s)')
  g.add_argument('--timeout', type=float, default=120.0, help='per-request timeout in seconds (default: %(default)s)')


def client_from_args(args: argparse.Namespace, **kwargs) -> ChatClient:
  if not args.model:
    raise ValueError('--model is required to send requests')
  config = ClientConfig(base_url=args.base_url, model=args.model, temperature=args.temperature,
                        max_tokens=args.max_tokens, api_key_env=args.api_key_env or None,
                        concurrency=args.concurrency, max_retries=args.max_retries,
                        backoff_s=args.backoff, max_backoff_s=max(60.0, args.backoff),
                        timeout_s=args.timeout)
  return ChatClient(config, **kwargs)

