"""Continuous batching: `max_batch_size` decode slots over one KV cache; a finished request's slot is refilled from
the queue before the next decode step.

    engine = Engine(im, max_batch_size=8, max_context=2048)
    engine.start()                       # compiles every shape, then runs the loop in a thread
    req = engine.submit(ids, pixels, max_tokens=64, temperature=0.0, top_p=1.0, seed=0, stop=(), sink=callback)

The cache is a ring of `max_context` slots shared by all rows: one write index advances every step, and each
row's live tokens are its last `prompt bucket + generated` slots (so a request needs bucket + max_tokens <=
max_context). Admission prefills the waiting prompts of one length bucket together in a fresh cache and
scatters their K/V into the free rows just behind the write index; the row's mask is reset to its prompt, so
whatever an earlier occupant left is never attended to. Every program (prefill per bucket and prefill batch,
one decode step) is compiled at start-up; requests differ only in traced values (tokens, seeds, temperature,
top_p), so nothing recompiles while serving.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.data import image as image_lib
from llava_jax.generate import TextStream, eos_array, sample_logits_per_row
from llava_jax.inference import InferenceModel, stop_strings_for
from llava_jax.models.llava import init_cache


class QueueFull(Exception):
  """The waiting queue holds `max_queue` requests (HTTP 429)."""


@dataclasses.dataclass
class Request:
  """One generation. `sink(event)` is called from the engine thread with ('delta', text) and finally
  ('done', finish_reason, completion_tokens) or ('error', message)."""
  prompt: np.ndarray                # int32 [n] with the image tokens expanded
  pixels: Optional[np.ndarray]      # float32 [H, W, 3] or None
  max_tokens: int
  temperature: float
  top_p: float
  seed: int
  stop: tuple
  sink: Callable
  bucket: int = 0
  row: Optional[int] = None
  cancelled: bool = False           # set by the server when the client goes away: the slot is freed
  text: Optional[TextStream] = None
  generated: int = 0
  submitted: float = 0.0

  def cancel(self):
    self.cancelled = True


def prompt_buckets(max_context: int, smallest: int = 64) -> tuple[int, ...]:
  """Powers of two from `smallest` below `max_context` (a prompt needs at least one slot left to answer)."""
  out, b = [], smallest
  while b < max_context:
    out.append(b)
    b *= 2
  return tuple(out) or (max_context - 1,)


# ------------------------------------------------------------------------------------------ device programs

@functools.partial(jax.jit, static_argnames=('model',), donate_argnames=('state',))
def _admit(model, params, state, input_ids, attention_mask, pixel_values, rows, seeds, temperature, top_p):
  """Prefill n left-padded prompts [n, P] into rows `rows` [n] (row >= batch: padding, dropped) of the ring.

  Returns the new state and each prompt's first token [n].
  """
  n, p = input_ids.shape
  t = state['mask'].shape[1]
  cache = init_cache(model.config, n, p)
  logits, cache = model.apply({'params': params}, input_ids, pixel_values, attention_mask=attention_mask,
                              cache=cache, last_logits_only=True)
  slots = (state['index'] - p + jnp.arange(p)) % t  # the p slots just behind the write index
  keys = jax.vmap(jax.random.key)(seeds)
  first = _sample(model, logits[:, -1], keys, jnp.zeros((n,), jnp.int32), temperature, top_p)
  put = lambda full, new: full.at[rows].set(new, mode='drop')
  rows_mask = jnp.zeros((n, t), bool).at[:, slots].set(attention_mask.astype(bool))
  return {**state,
          'k': state['k'].at[:, rows[:, None], slots[None, :]].set(cache['k'], mode='drop'),
          'v': state['v'].at[:, rows[:, None], slots[None, :]].set(cache['v'], mode='drop'),
          'mask': put(state['mask'], rows_mask), 'next_pos': put(state['next_pos'], cache['next_pos']),
          'last': put(state['last'], first), 'keys': put(state['keys'], jax.random.key_data(keys)),
          'count': put(state['count'], jnp.ones((n,), jnp.int32)), 'temperature': put(state['temperature'],
                                                                                         temperature),
          'top_p': put(state['top_p'], top_p)}, first


@functools.partial(jax.jit, static_argnames=('model', 'rows'), donate_argnames=('state',))
def _step(model, params, state, *, rows):
  """One decode step for the first `rows` rows (the busy ones: requests take the lowest free row): feeds each
  row's last token, writes its K/V at the ring index. The other rows are left as they are."""
  part = {k: state[k][:, :rows] if k in ('k', 'v') else state[k][:rows]
          for k in ('k', 'v', 'mask', 'next_pos', 'last', 'keys', 'count', 'temperature', 'top_p')}
  cache = {**{k: part[k] for k in ('k', 'v', 'mask', 'next_pos')}, 'index': state['index']}
  last = part['last'][:, None]
  logits, cache = model.apply({'params': params}, last, None, attention_mask=jnp.ones_like(last), cache=cache)
  keys = jax.random.wrap_key_data(part['keys'])
  tok = _sample(model, logits[:, -1], keys, part['count'], part['temperature'], part['top_p'])
  new = {'k': cache['k'], 'v': cache['v'], 'mask': cache['mask'], 'next_pos': cache['next_pos'], 'last': tok,
         'count': part['count'] + 1}
  # Written back in place (the state is donated); all rows share the ring index.
  out = {k: state[k].at[:, :rows].set(x) if k in ('k', 'v') else state[k].at[:rows].set(x) for k, x in new.items()}
  return {**state, **out, 'index': cache['index'] % state['mask'].shape[1]}, tok


def _sample(model, logits, keys, step, temperature, top_p):
  logits = logits.at[:, model.config.image_token_id].set(-jnp.inf)  # the placeholder is never generated
  return sample_logits_per_row(logits, jax.vmap(jax.random.fold_in)(keys, step), temperature, top_p)


def _init_state(config, batch: int, max_context: int):
  cache = init_cache(config, batch, max_context)
  return {**cache, 'last': jnp.zeros((batch,), jnp.int32),
          'keys': jax.random.key_data(jax.vmap(jax.random.key)(jnp.zeros((batch,), jnp.int32))),
          'count': jnp.zeros((batch,), jnp.int32), 'temperature': jnp.zeros((batch,), jnp.float32),
          'top_p': jnp.ones((batch,), jnp.float32)}


# ------------------------------------------------------------------------------------------ the engine

class Engine:
  """The batching loop over one InferenceModel (its sampler's model and params).

  max_context: ring slots per row (default: the model's max_position_embeddings). prefill_sizes: how many
  waiting prompts of one bucket are prefilled together (each size is a compiled program per bucket).
  """

  def __init__(self, im: InferenceModel, *, max_batch_size: int = 8, max_context: Optional[int] = None,
               buckets: Optional[Sequence[int]] = None, prefill_sizes: Optional[Sequence[int]] = None,
               max_queue: int = 256, log=print):
    self.im, self.model, self.params = im, im.sampler.model, im.sampler.params
    self.config = im.config
    self.batch = max_batch_size
    self.max_context = max_context or self.config.text.max_position_embeddings
    if self.max_context > self.config.text.max_position_embeddings:
      raise ValueError(f'max_context {self.max_context} > the model\'s max_position_embeddings '
                       f'{self.config.text.max_position_embeddings}')
    window = self.config.text.sliding_window
    if window is not None and self.max_context > window:  # the window is by slot distance, which a ring wraps
      raise ValueError(f'max_context {self.max_context} > the model\'s sliding_window {window}: pass '
                       f'--max-context {window} or less')
    self.buckets = tuple(sorted(buckets or prompt_buckets(self.max_context)))
    if self.buckets[-1] >= self.max_context:
      raise ValueError(f'prompt bucket {self.buckets[-1]} leaves no room to answer in max_context '
                       f'{self.max_context}')
    self.prefill_sizes = tuple(sorted(set(prefill_sizes or {1, min(8, max_batch_size)})))
    # Decode programs over the first n rows: a lone request does not pay for max_batch_size rows.
    self.step_sizes = tuple(sorted({1, min(8, max_batch_size), max_batch_size}))
    if self.prefill_sizes[-1] > max_batch_size:
      raise ValueError(f'prefill size {self.prefill_sizes[-1]} > max_batch_size {max_batch_size}')
    self.max_queue, self.log = max_queue, log
    tok = im.tokenizer
    self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    self.eos = eos_array(tok.eos_token_id)
    self.template_stops = stop_strings_for(im.template)
    self.blank = image_lib.blank_image(self.config.vision.image_size)
    self.waiting: collections.deque[Request] = collections.deque()
    self.slots: list[Optional[Request]] = [None] * self.batch
    self.lock = threading.Condition()
    self.ready = threading.Event()
    self.stats = collections.Counter()
    self._stop = False
    self.thread: Optional[threading.Thread] = None

  # -------------------------------------------------------------------------------------------- requests

  def bucket_for(self, n: int) -> Optional[int]:
    return next((b for b in self.buckets if b >= n), None)

  def submit(self, prompt, pixels, *, max_tokens: int, temperature: float, top_p: float, seed: int,
             stop: Sequence[str], sink: Callable) -> Request:
    """Queues a request (checked by the caller: bucket_for(len(prompt)) + max_tokens <= max_context).
    Raises QueueFull."""
    bucket = self.bucket_for(len(prompt))
    if bucket is None or bucket + max_tokens > self.max_context:
      raise ValueError(f'prompt of {len(prompt)} tokens + max_tokens {max_tokens} does not fit max_context '
                       f'{self.max_context}')
    req = Request(np.asarray(prompt, np.int32), pixels, max_tokens, float(temperature), float(top_p), int(seed),
                  tuple(stop) + self.template_stops, sink, bucket=bucket, submitted=time.monotonic())
    req.text = TextStream(self.im.tokenizer, req.stop)
    with self.lock:
      if len(self.waiting) >= self.max_queue:
        raise QueueFull(f'the queue holds {self.max_queue} requests; retry later')
      self.waiting.append(req)
      self.lock.notify()
    return req

  # -------------------------------------------------------------------------------------------- start-up

  def start(self):
    """Compiles every program (progress on `log`), then starts the loop thread."""
    t0 = time.time()
    self.state = _init_state(self.config, self.batch, self.max_context)
    programs = [(n, p) for p in self.buckets for n in self.prefill_sizes]
    for i, (n, p) in enumerate(programs):
      self.run_idle_prefill(n, p)
      self.log(f'compiled prefill {i + 1}/{len(programs)} (batch {n}, prompt {p}) {time.time() - t0:.1f}s')
    for n in self.step_sizes:
      self.run_idle_step(n)
      self.log(f'compiled decode step (rows {n} of {self.batch}, context {self.max_context}) '
               f'{time.time() - t0:.1f}s')
    self.thread = threading.Thread(target=self._loop, name='engine', daemon=True)
    self.thread.start()
    self.ready.set()

  def run_idle_prefill(self, n: int, p: int):
    """Runs the prefill program of n prompts of length p with every write dropped (rows = batch): compiles it,
    or times it. Only while the loop is idle (start-up, or holding `lock` with no request in flight)."""
    ids, mask = np.full((n, p), self.pad_id, np.int32), np.ones((n, p), np.int32)
    self.state, first = _admit(self.model, self.params, self.state, ids, mask,
                               np.broadcast_to(self.blank, (n, *self.blank.shape)),
                               np.full((n,), self.batch, np.int32), np.zeros((n,), np.int32),
                               np.zeros((n,), np.float32), np.ones((n,), np.float32))
    first.block_until_ready()

  def run_idle_step(self, n: int):
    """Runs the decode program over the first n rows (as run_idle_prefill: only while no request is in flight)."""
    self.state, tok = _step(self.model, self.params, self.state, rows=n)
    tok.block_until_ready()

  def shutdown(self):
    with self.lock:
      self._stop = True
      self.lock.notify()
    if self.thread is not None:
      self.thread.join(timeout=30)

  # -------------------------------------------------------------------------------------------- the loop

  def _loop(self):
    pending = collections.deque()  # (device tokens, [(index in tokens, row, request)]) not yet read back
    while True:
      with self.lock:
        while not self._stop and not self.waiting and not pending and not any(self.slots):
          self.lock.wait()
        if self._stop:
          break
        admitted = self._take_waiting()
      self._free_cancelled()
      try:
        self._iteration(admitted, pending)
      except Exception as e:  # a failing program fails the requests in flight, not the server
        self.log(f'generation failed: {type(e).__name__}: {e}')
        failed = [r for reqs in admitted for r in reqs] + [r for r in self.slots if r is not None]
        for r in {id(r): r for r in failed}.values():
          self._finish_row(r, error=f'generation failed: {type(e).__name__}')
        pending.clear()
        self.state = _init_state(self.config, self.batch, self.max_context)  # its buffers may be donated
    for r in [r for r in self.slots if r is not None] + list(self.waiting):
      r.sink(('error', 'server shutting down'))

  def _iteration(self, admitted, pending):
    """Prefills the admitted prompts, dispatches one decode step, reads back the previous program's tokens."""
    for bucket_reqs in admitted:
      pending.append(self._admit(bucket_reqs))
    if any(self.slots):
      busy = max(row for row, r in enumerate(self.slots) if r is not None) + 1
      t0 = time.perf_counter()
      rows = next(n for n in self.step_sizes if n >= busy)
      self.state, tok = _step(self.model, self.params, self.state, rows=rows)
      self.stats['dispatch_s'] += time.perf_counter() - t0
      owners = [(row, row, r) for row, r in enumerate(self.slots) if r is not None]
      pending.append((tok, owners))
      self.stats['steps'] += 1
      self.stats['row_steps'] += len(owners)  # / steps = mean rows busy per step
    # Lag one program: read back the previous tokens while the device runs the step just dispatched.
    while len(pending) > (1 if any(self.slots) else 0):
      self._consume(*pending.popleft())

  def _take_waiting(self) -> list[list[Request]]:
    """Moves waiting requests into free rows (oldest first); grouped by bucket, in prefill-size chunks."""
    free = [i for i, r in enumerate(self.slots) if r is None]
    taken = []
    while free and self.waiting:
      r = self.waiting.popleft()
      if r.cancelled:
        self.stats['cancelled'] += 1
        continue
      r.row = free.pop(0)
      self.slots[r.row] = r
      taken.append(r)
    groups = collections.defaultdict(list)
    for r in taken:
      groups[r.bucket].append(r)
    chunks, top = [], self.prefill_sizes[-1]
    for reqs in groups.values():
      chunks += [reqs[i:i + top] for i in range(0, len(reqs), top)]
    return chunks

  def _admit(self, reqs: list[Request]):
    n = next(s for s in self.prefill_sizes if s >= len(reqs))
    p = reqs[0].bucket
    ids = np.full((n, p), self.pad_id, np.int32)
    mask = np.zeros((n, p), np.int32)
    ids[:, -1], mask[:, -1] = self.pad_id, 1  # padding rows: one real token, so no row is fully masked
    pixels = np.broadcast_to(self.blank, (n, *self.blank.shape)).copy()
    rows = np.full((n,), self.batch, np.int32)
    seeds, temperature, top_p = np.zeros((n,), np.int32), np.zeros((n,), np.float32), np.ones((n,), np.float32)
    for i, r in enumerate(reqs):
      ids[i] = self.pad_id
      mask[i] = 0
      ids[i, p - len(r.prompt):], mask[i, p - len(r.prompt):] = r.prompt, 1
      if r.pixels is not None:
        pixels[i] = r.pixels
      rows[i], seeds[i], temperature[i], top_p[i] = r.row, r.seed, r.temperature, r.top_p
    t0 = time.perf_counter()
    self.state, first = _admit(self.model, self.params, self.state, ids, mask, pixels, rows,
                               seeds.astype(np.int32), temperature, top_p)
    self.stats['prefills'] += 1
    self.stats['prefill_rows'] += len(reqs)
    self.stats['dispatch_s'] += time.perf_counter() - t0
    return first, [(i, r.row, r) for i, r in enumerate(reqs)]

  def _consume(self, tokens, owners):
    t0 = time.perf_counter()
    tokens = np.asarray(tokens)
    t1 = time.perf_counter()
    self.stats['wait_s'] += t1 - t0  # the host waiting for the device (profile: where time goes)
    for i, row, r in owners:
      if self.slots[row] is not r:  # finished or cancelled since this program was dispatched
        continue
      t = int(tokens[i])
      if t in self.eos:
        self._finish_row(r, 'stop')
        continue
      r.generated += 1
      delta = r.text.push([t])
      if delta:
        r.sink(('delta', delta))
      if r.text.stopped:
        self._finish_row(r, 'stop')
      elif r.generated >= r.max_tokens:
        self._finish_row(r, 'length')
    self.stats['host_s'] += time.perf_counter() - t1

  def _finish_row(self, r: Request, reason: Optional[str] = None, error: Optional[str] = None):
    if r.row is not None and self.slots[r.row] is r:
      self.slots[r.row] = None
    if error is not None:
      r.sink(('error', error))
      return
    tail = r.text.flush()
    if tail:
      r.sink(('delta', tail))
    self.stats['completed'] += 1
    r.sink(('done', reason, len(r.text.ids)))

  def _free_cancelled(self):
    for row, r in enumerate(self.slots):
      if r is not None and r.cancelled:
        self.slots[row] = None
        self.stats['cancelled'] += 1

  def queue_depth(self) -> int:
    return len(self.waiting)
