"""A fake OpenAI-compatible chat-completions server on 127.0.0.1 for tests.

    with ChatServer(reply=lambda request: 'hello') as server:
      server.add_fault('429', match='image 3', times=2, retry_after_ms=10)
      client = ChatClient(ClientConfig(base_url=server.base_url, model='m', api_key_env=None))

`reply` answers a request: a callable `request_json -> str`, or a dict `{substring: reply}` matched
against the last user message (first matching substring wins; no match is an HTTP 400).
Faults are injected per rule: the first `times` requests whose last user message contains `match`
(every request when match is None; times=None means always) get the fault instead of the reply:
  '429'     HTTP 429 with `Retry-After` (seconds) and/or `retry-after-ms`
  '500'     HTTP 500
  'slow'    sleeps `delay` seconds, then answers normally (use delay > the client timeout)
  'garbage' a well-formed completion whose content is `text` (unparsable for the caller)
  'badjson' HTTP 200 with a body that is not JSON
  'drop'    closes the connection without a response
  'status'  HTTP `status` with error message `text` (e.g. 400, 401, 503)
Usage is counted in whitespace-separated words: prompt = all message words, completion = reply words.
"""
from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from typing import Callable, Optional, Union

FAULT_KINDS = ('429', '500', 'slow', 'garbage', 'badjson', 'drop', 'status')


class _Rule:

  def __init__(self, kind, match, times, retry_after, retry_after_ms, delay, text, status):
    if kind not in FAULT_KINDS:
      raise ValueError(f'fault kind {kind!r}; allowed: {FAULT_KINDS}')
    self.kind, self.match, self.left, self.status = kind, match, times, status
    self.retry_after, self.retry_after_ms, self.delay, self.text = retry_after, retry_after_ms, delay, text
    self.fired = 0

  def take(self, prompt: str) -> bool:
    if self.match is not None and self.match not in prompt:
      return False
    if self.left is not None:
      if self.left <= 0:
        return False
      self.left -= 1
    self.fired += 1
    return True


def last_user_message(request: dict) -> str:
  for message in reversed(request.get('messages', [])):
    if message.get('role') == 'user':
      return message.get('content', '')
  return ''


class ChatServer:
  """Threaded HTTP server; `requests` records every parsed request body (with its headers)."""

  def __init__(self, reply: Union[Callable[[dict], str], dict], *, api_key: Optional[str] = None):
    self._reply = reply
    self.api_key = api_key
    self.requests: list[dict] = []
    self.headers: list = []
    self.rules: list[_Rule] = []
    self._lock = threading.Lock()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def log_message(self, *args):  # keep test output clean
        pass

      def do_POST(self):
        server._handle(self)

    self._httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self._httpd.daemon_threads = True
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

  @property
  def base_url(self) -> str:
    return f'http://127.0.0.1:{self._httpd.server_address[1]}/v1'

  def start(self) -> 'ChatServer':
    self._thread.start()
    return self

  def stop(self):
    self._httpd.shutdown()
    self._httpd.server_close()

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  def add_fault(self, kind: str, *, match: Optional[str] = None, times: Optional[int] = 1,
                retry_after: Optional[str] = None, retry_after_ms: Optional[int] = None,
                delay: float = 0.0, text: str = '@@ garbage @@ <<>>', status: int = 400) -> _Rule:
    rule = _Rule(kind, match, times, retry_after, retry_after_ms, delay, text, status)
    with self._lock:
      self.rules.append(rule)
    return rule

  def clear_faults(self):
    with self._lock:
      self.rules.clear()

  def answer(self, request: dict) -> Optional[str]:
    if callable(self._reply):
      return self._reply(request)
    prompt = last_user_message(request)
    for needle, text in self._reply.items():
      if needle in prompt:
        return text
    return None

  # -------------------------------------------------------------------------------------------------

  def _send(self, handler, status: int, body: bytes, headers: Optional[dict] = None):
    try:
      handler.send_response(status)
      handler.send_header('Content-Type', 'application/json')
      handler.send_header('Content-Length', str(len(body)))
      for k, v in (headers or {}).items():
        handler.send_header(k, v)
      handler.end_headers()
      handler.wfile.write(body)
    except OSError:  # the client timed out and left
      handler.close_connection = True

  def _error(self, handler, status: int, message: str, headers: Optional[dict] = None):
    self._send(handler, status, json.dumps({'error': {'message': message}}).encode(), headers)

  def _handle(self, handler):
    length = int(handler.headers.get('Content-Length', 0))
    raw = handler.rfile.read(length)
    if not handler.path.endswith('/chat/completions'):
      return self._error(handler, 404, f'no route {handler.path}')
    try:
      request = json.loads(raw)
    except ValueError:
      return self._error(handler, 400, 'body is not JSON')
    with self._lock:
      self.requests.append(request)
      self.headers.append(handler.headers)  # an email.message.Message: names match in any case
      prompt = last_user_message(request)
      rule = next((r for r in self.rules if r.take(prompt)), None)
    if self.api_key is not None and handler.headers.get('Authorization') != f'Bearer {self.api_key}':
      return self._error(handler, 401, 'invalid api key')
    if rule is not None and rule.kind != 'slow':
      if rule.kind == '429':
        headers = {}
        if rule.retry_after is not None:
          headers['Retry-After'] = rule.retry_after
        if rule.retry_after_ms is not None:
          headers['retry-after-ms'] = str(rule.retry_after_ms)
        return self._error(handler, 429, 'rate limited', headers)
      if rule.kind == '500':
        return self._error(handler, 500, 'internal error')
      if rule.kind == 'status':
        return self._error(handler, rule.status, rule.text)
      if rule.kind == 'badjson':
        return self._send(handler, 200, b'<html>upstream proxy error</html>')
      if rule.kind == 'drop':
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)
        return
    if rule is not None and rule.kind == 'slow':
      time.sleep(rule.delay)
    text = rule.text if rule is not None and rule.kind == 'garbage' else self.answer(request)
    if text is None:
      return self._error(handler, 400, 'no fixture reply for this request')
    prompt_tokens = sum(len(str(m.get('content', '')).split()) for m in request.get('messages', []))
    completion_tokens = len(text.split())
    body = {
        'id': f'chatcmpl-{len(self.requests)}', 'object': 'chat.completion', 'created': int(time.time()),
        'model': request.get('model', ''),
        'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': text}, 'finish_reason': 'stop'}],
        'usage': {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
                  'total_tokens': prompt_tokens + completion_tokens},
    }
    self._send(handler, 200, json.dumps(body).encode())
