"""The HTTP API (FastAPI): /health, /v1/models and /v1/chat/completions (JSON or SSE stream) over one Engine.

Request bodies and keys are never logged; errors are OpenAI-style bodies (see protocol.APIError).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import secrets
import time
import uuid
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_jax.data import conversation, image as image_lib, tokenize
from llava_jax.serve import protocol
from llava_jax.serve.engine import Engine, QueueFull
from llava_jax.serve.protocol import APIError, Limits


@dataclasses.dataclass
class Prepared:
  """A checked request, ready for the engine."""
  prompt: np.ndarray
  pixels: Optional[np.ndarray]
  max_tokens: int
  temperature: float
  top_p: float
  seed: int
  stop: tuple


def prepare(engine: Engine, conv: protocol.Conversation, *, max_tokens: int, temperature: float, top_p: float,
            seed: Optional[int], stop=()) -> Prepared:
  """A parsed conversation -> prompt ids and pixels in the model's template and image aspect; APIError 400 when
  the prompt and max_tokens do not fit the context. Shared by the API and the web chat."""
  im = engine.im
  template = conversation.get_template(im.template)
  if conv.system is not None:
    template = dataclasses.replace(template, system=conv.system)
  ids = tokenize.tokenize_prompt(conv.turns, im.tokenizer, template, tokenize.ImageTokens.of(im.config))
  bucket = engine.bucket_for(len(ids))
  if bucket is None or bucket + max_tokens > engine.max_context:
    room = engine.max_context - (bucket or engine.max_context)
    raise APIError(400, f'the prompt is {len(ids)} tokens; with max_tokens={max_tokens} it does not fit the '
                   f'context of {engine.max_context} tokens (at most {max(room, 0)} new tokens for this prompt; '
                   f'longest prompt {engine.buckets[-1]})', param='messages', code='context_length_exceeded')
  pixels = None
  if conv.image is not None:
    pixels = image_lib.preprocess_image(conv.image, im.config.vision.image_size, im.image_aspect)
  seed = secrets.randbits(31) if seed is None else seed % 2**31
  return Prepared(ids, pixels, max_tokens, temperature, top_p, seed, tuple(stop))


def submit(engine: Engine, p: Prepared, loop: asyncio.AbstractEventLoop):
  """Queues a prepared request; returns (request, asyncio queue of its events). APIError 429 when full."""
  events: asyncio.Queue = asyncio.Queue()
  try:
    req = engine.submit(p.prompt, p.pixels, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                        seed=p.seed, stop=p.stop, sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
  except QueueFull as e:
    raise APIError(429, str(e), type='rate_limit_error', code='rate_limit_exceeded') from None
  return req, events


def create_app(engine: Engine, *, model_name: str, image_dir: Optional[str] = None, limits: Limits = Limits(),
               api_key: Optional[str] = None) -> FastAPI:
  app = FastAPI(title='llava_jax', docs_url=None, redoc_url=None, openapi_url=None)
  created = int(time.time())

  @app.exception_handler(APIError)
  async def _api_error(request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request, e: StarletteHTTPException):
    return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

  @app.exception_handler(Exception)
  async def _server_error(request, e: Exception):
    return JSONResponse(APIError(500, f'internal error ({type(e).__name__})', type='server_error').body(),
                        status_code=500)

  def check_auth(request: Request):
    if api_key is None:
      return
    header = request.headers.get('authorization', '')
    scheme, _, token = header.partition(' ')
    if scheme.lower() != 'bearer' or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
      raise APIError(401, 'missing or wrong API key (Authorization: Bearer ...)', code='invalid_api_key')

  def check_ready():
    if not engine.ready.is_set():
      raise APIError(503, 'the model is still loading', type='server_error')

  @app.get('/health')
  async def health():
    if not engine.ready.is_set():
      return JSONResponse({'status': 'loading'}, status_code=503)
    return {'status': 'ok', 'model': model_name, 'queue': engine.queue_depth()}

  def model_card():
    return {'id': model_name, 'object': 'model', 'created': created, 'owned_by': 'llava_jax'}

  @app.get('/v1/models')
  async def models(request: Request):
    check_auth(request)
    return {'object': 'list', 'data': [model_card()]}

  @app.get('/v1/models/{name:path}')
  async def model(name: str, request: Request):
    check_auth(request)
    if name != model_name:
      raise APIError(404, f'model {name!r} does not exist; this server serves {model_name!r}', param='model',
                     code='model_not_found')
    return model_card()

  @app.post('/v1/chat/completions')
  async def chat_completions(request: Request):
    check_auth(request)
    check_ready()
    body = await _read_body(request, limits.max_body_bytes)
    req = protocol.parse_request(body)
    if req.model != model_name:
      raise APIError(404, f'model {req.model!r} does not exist; this server serves {model_name!r}', param='model',
                     code='model_not_found')
    max_tokens = protocol.max_tokens_of(req, limits)
    stop = protocol.stop_of(req)
    conv = await run_in_threadpool(protocol.parse_messages, req.messages, image_dir, limits)  # decodes images
    prepared = await run_in_threadpool(prepare, engine, conv, max_tokens=max_tokens, temperature=req.temperature,
                                       top_p=req.top_p, seed=req.seed, stop=stop)
    gen, events = submit(engine, prepared, asyncio.get_running_loop())
    cid, now = f'chatcmpl-{uuid.uuid4().hex}', int(time.time())
    if req.stream:
      include_usage = bool(req.stream_options and req.stream_options.include_usage)
      return StreamingResponse(_stream(gen, events, cid, now, model_name, len(prepared.prompt), include_usage),
                               media_type='text/event-stream', headers={'Cache-Control': 'no-cache'})
    text, reason, n = await _collect(gen, events, request)
    return {'id': cid, 'object': 'chat.completion', 'created': now, 'model': model_name,
            'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': text}, 'finish_reason': reason,
                         'logprobs': None}],
            'usage': _usage(len(prepared.prompt), n)}

  return app


def serve_in_thread(app, host: str = '127.0.0.1', port: int = 0):
  """Starts uvicorn on `app` in a daemon thread (port 0: a free one) -> (server, base url). For tests and the
  bench; stop with `server.should_exit = True`."""
  import threading
  import uvicorn
  server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level='warning'))
  threading.Thread(target=server.run, daemon=True).start()
  for _ in range(400):
    if server.started:
      port = server.servers[0].sockets[0].getsockname()[1]
      return server, f'http://{host}:{port}'
    time.sleep(0.05)
  raise RuntimeError('uvicorn did not start')


async def _read_body(request: Request, limit: int) -> bytes:
  length = request.headers.get('content-length')
  if length is not None and (not length.isdigit() or int(length) > limit):
    raise APIError(413, f'the request body is over {limit} bytes')
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise APIError(413, f'the request body is over {limit} bytes')
    chunks.append(chunk)
  return b''.join(chunks)


def _usage(prompt: int, completion: int) -> dict:
  return {'prompt_tokens': prompt, 'completion_tokens': completion, 'total_tokens': prompt + completion}


async def _collect(gen, events: asyncio.Queue, request: Request):
  """Waits for a whole answer; a client that goes away cancels its generation (frees the slot)."""
  parts = []
  try:
    while True:
      try:
        ev = await asyncio.wait_for(events.get(), timeout=1.0)
      except asyncio.TimeoutError:
        if await request.is_disconnected():
          gen.cancel()
          raise APIError(499, 'client closed the request')
        continue
      if ev[0] == 'delta':
        parts.append(ev[1])
      elif ev[0] == 'done':
        return ''.join(parts), _finish_reason(ev[1]), ev[2]
      else:
        raise APIError(500, ev[1], type='server_error')
  except asyncio.CancelledError:
    gen.cancel()
    raise


def _finish_reason(reason: str) -> str:
  return 'length' if reason == 'length' else 'stop'


async def _stream(gen, events: asyncio.Queue, cid: str, created: int, model: str, prompt_tokens: int,
                  include_usage: bool):
  """SSE `chat.completion.chunk` events, then `data: [DONE]`. Closing the connection cancels the generation."""

  def chunk(delta, reason=None, usage=None):
    d = {'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': model,
         'choices': [] if usage else [{'index': 0, 'delta': delta, 'finish_reason': reason, 'logprobs': None}]}
    if usage:
      d['usage'] = usage
    return f'data: {json.dumps(d)}\n\n'

  try:
    yield chunk({'role': 'assistant', 'content': ''})
    while True:
      ev = await events.get()
      if ev[0] == 'delta':
        yield chunk({'content': ev[1]})
      elif ev[0] == 'done':
        yield chunk({}, _finish_reason(ev[1]))
        if include_usage:
          yield chunk(None, usage=_usage(prompt_tokens, ev[2]))
        break
      else:
        yield f'data: {json.dumps(APIError(500, ev[1], type="server_error").body())}\n\n'
        break
    yield 'data: [DONE]\n\n'
  finally:
    gen.cancel()  # a no-op once finished
