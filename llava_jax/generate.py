"""Batched autoregressive generation with the KV cache: jit-compiled prefill, then a jit-compiled decode loop.

    sampler = Sampler(Llava(config), params)
    out = sampler(input_ids, attention_mask, pixel_values, max_new_tokens=64, eos_token_id=2,
                  tokenizer=tok, stop_strings=('</s>',))
    out.texts, out.tokens, out.lengths, out.finish_reasons

Prompts are LEFT-padded so that every sample's next token is written to the same cache slot. The decode loop is a
`lax.while_loop` that runs up to `chunk_size` steps per call and exits early once every sample is done (EOS);
between calls the host checks stop strings on decoded text and streams text deltas. Without stop strings or a
stream callback the whole budget runs in one device call. Shapes (batch, prompt length, max_new_tokens) fix the
compiled programs: callers bucket prompt lengths (see `pad_batch`) to compile a few shapes only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax import sharding
from llava_jax.models.llava import check_image_tokens, init_cache, param_logical_axes


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 = greedy (the evals); the original CLI uses 0.2. top_k 0 and top_p 1 switch those filters off."""
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'temperature={self.temperature} must be >= 0')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p={self.top_p} must be in (0, 1]')
    if self.top_k < 0:
      raise ValueError(f'top_k={self.top_k} must be >= 0')


@dataclasses.dataclass
class GenerateOutput:
  tokens: np.ndarray          # [batch, max_new_tokens] int32, pad_token_id after each sample's end
  lengths: np.ndarray         # [batch] kept tokens (EOS excluded; through the token completing a stop string)
  finish_reasons: list[str]   # 'eos' | 'stop' (stop string) | 'length'
  texts: Optional[list[str]]  # decoded, cut before the first stop string (needs a tokenizer)


def sample_logits(logits, rng, sampling: SamplingParams):
  """logits [batch, vocab] -> token ids [batch] int32 (greedy, or temperature with top-k then top-p)."""
  logits = logits.astype(jnp.float32)
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k > 0:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    logits = top_p_filter(logits, sampling.top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def top_p_filter(logits, top_p):
  """logits [batch, vocab], top_p a float or [batch, 1] -> logits outside the nucleus set to -inf."""
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  threshold = jnp.take_along_axis(sorted_logits, keep.sum(-1, keepdims=True) - 1, axis=-1)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_logits_per_row(logits, keys, temperature, top_p):
  """Each row its own setting: logits [batch, vocab], keys [batch] PRNG keys, temperature and top_p [batch]
  (traced, so mixing requests never recompiles; temperature 0 = greedy) -> token ids [batch] int32."""
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  scaled = top_p_filter(scaled, top_p[:, None])
  sampled = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, scaled).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def pad_batch(prompts: Sequence[Sequence[int]], pad_token_id: int, multiple: int = 1):
  """Left-pad token lists to a common length (rounded up to `multiple`) -> (input_ids, attention_mask) int32."""
  longest = max(len(p) for p in prompts)
  length = -(-longest // multiple) * multiple
  ids = np.full((len(prompts), length), pad_token_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    if len(p):
      ids[i, length - len(p):] = p
      mask[i, length - len(p):] = 1
  return ids, mask


class TextStream:
  """Incremental decoding of one sample: stop-string search and the text that is safe to show so far."""

  def __init__(self, tokenizer, stop_strings: Sequence[str]):
    self.tokenizer, self.stop_strings = tokenizer, tuple(stop_strings)
    self.ids: list[int] = []
    self.shown = 0
    self.text = ''
    self.stopped = False

  def _decode(self, ids):
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  def push(self, new_ids) -> str:
    """Adds tokens; returns the new text to show. Sets `stopped` (and trims `ids`) when a stop string appears."""
    start = len(self.ids)
    self.ids.extend(int(t) for t in new_ids)
    text = self._decode(self.ids)
    cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
    if cut >= 0:
      # Keep the tokens through the one that completes the stop string.
      for n in range(start + 1, len(self.ids) + 1):
        if any(s in self._decode(self.ids[:n]) for s in self.stop_strings):
          del self.ids[n:]
          break
      self.text, self.stopped = text[:cut], True
      safe = cut
    else:
      self.text = text
      safe = len(text.rstrip('\ufffd'))  # an incomplete UTF-8 sequence decodes to U+FFFD until it completes
      hold = 0
      for s in self.stop_strings:  # hold back a suffix that may grow into a stop string
        hold = max([hold] + [k for k in range(1, min(len(s), safe + 1)) if text[:safe].endswith(s[:k])])
      safe -= hold
    delta = text[self.shown:safe] if safe > self.shown else ''
    self.shown = max(self.shown, safe)
    return delta

  def flush(self) -> str:
    delta = self.text[self.shown:]
    self.shown = len(self.text)
    return delta


# ---------------------------------------------------------------------- device programs (shared by all Samplers
# of equal models: flax modules hash by value, so the compiled programs are reused)

MAX_EOS = 8  # EOS ids are a traced int32[MAX_EOS] (-1 = unused), so changing them does not recompile


def eos_array(eos_token_id) -> np.ndarray:
  """None, an id or ids -> int32[MAX_EOS] padded with -1."""
  ids = sorted({int(e) for e in np.atleast_1d(eos_token_id)} if eos_token_id is not None else set())
  if len(ids) > MAX_EOS:
    raise ValueError(f'{len(ids)} EOS ids; at most {MAX_EOS}')
  return np.array(ids + [-1] * (MAX_EOS - len(ids)), np.int32)


def _next_token(model, logits, rng, step, done, sampling, eos, pad):
  """logits [b, vocab] -> (token [b], done [b]). The image placeholder id is never generated."""
  logits = logits.at[:, model.config.image_token_id].set(-jnp.inf)
  tok = sample_logits(logits, jax.random.fold_in(rng, step), sampling)
  tok = jnp.where(done, pad, tok)
  return tok, done | jnp.isin(tok, eos)


@functools.partial(jax.jit, static_argnames=('model', 'max_len', 'sampling'))
def _prefill(model, params, input_ids, attention_mask, pixel_values, rng, *, max_len, sampling, eos, pad):
  """Runs the whole left-padded prompt [b, S] through the model; samples the first new token."""
  b = input_ids.shape[0]
  cache = init_cache(model.config, b, max_len)
  logits, cache = model.apply({'params': params}, input_ids, pixel_values, attention_mask=attention_mask,
                              cache=cache, last_logits_only=True)
  tok, done = _next_token(model, logits[:, -1], rng, 0, jnp.zeros((b,), bool), sampling, eos, pad)
  tokens = jnp.full((b, max_len - input_ids.shape[1]), pad, jnp.int32).at[:, 0].set(tok)
  return {'cache': cache, 'tokens': tokens, 'done': done, 'step': jnp.ones((), jnp.int32), 'rng': rng}


@functools.partial(jax.jit, static_argnames=('model', 'sampling'), donate_argnames=('state',))
def _decode(model, params, state, stop_at, *, sampling, eos, pad):
  """Decodes one token per step until `stop_at` tokens exist or every sample is done."""

  def cond(s):
    return (s['step'] < stop_at) & ~jnp.all(s['done'])

  def body(s):
    last = jax.lax.dynamic_index_in_dim(s['tokens'], s['step'] - 1, axis=1)  # [b, 1]
    logits, cache = model.apply({'params': params}, last, None, attention_mask=jnp.ones_like(last),
                                cache=s['cache'])
    tok, done = _next_token(model, logits[:, -1], s['rng'], s['step'], s['done'], sampling, eos, pad)
    tokens = jax.lax.dynamic_update_index_in_dim(s['tokens'], tok, s['step'], axis=1)
    return {**s, 'cache': cache, 'tokens': tokens, 'done': done, 'step': s['step'] + 1}

  return jax.lax.while_loop(cond, body, state)


class Sampler:
  """Generation for one model and its params. Compiled programs are cached per input shape and sampling setting.

  With a `mesh`, params are placed by the model's logical axis rules (`llava_jax.sharding`), the batch is split
  over the mesh's batch axes ('data', 'fsdp') and the model's activation constraints apply, as in training.
  """

  def __init__(self, model, params, *, mesh: Optional[jax.sharding.Mesh] = None, rules=sharding.LOGICAL_RULES):
    self.model, self.config = model, model.config
    self.mesh, self.rules = mesh, rules
    if mesh is not None:
      params = jax.device_put(params, sharding.logical_to_mesh(param_logical_axes(self.config), params, mesh, rules))
    self.params = jax.device_put(params)  # once, not on every call (a no-op for arrays already placed)

  def _context(self):
    return contextlib.nullcontext() if self.mesh is None else sharding.activation_rules(self.mesh, self.rules)

  def _place(self, x):
    if x is None or self.mesh is None:
      return x
    return jax.device_put(x, sharding.batch_sharding(self.mesh, np.ndim(x)))

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, *, max_new_tokens: int,
               sampling: SamplingParams = SamplingParams(), eos_token_id=None, pad_token_id: int = 0,
               stop_strings: Sequence[str] = (), tokenizer=None, seed: int = 0,
               stream: Optional[Callable[[int, str], None]] = None, chunk_size: Optional[int] = None
               ) -> GenerateOutput:
    """input_ids, attention_mask [batch, prompt_len] LEFT-padded; pixel_values [batch, H, W, 3], or
    [batch, images, H, W, 3] for prompts with several images (image j fills the j-th run of image tokens), or None.

    eos_token_id: int or ids that end a sample. stop_strings end it when they appear in the decoded text (needs
    `tokenizer`). stream(sample_index, text_delta) is called as text becomes final. Deterministic for a seed
    (given the same batch).
    """
    input_ids = np.asarray(input_ids, np.int32)
    b, prompt_len = input_ids.shape
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f'attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}')
    if not attention_mask[:, -1].all():
      raise ValueError('prompts must be LEFT-padded: attention_mask[:, -1] has zeros')
    several = pixel_values is not None and np.ndim(pixel_values) == 5
    check_image_tokens(input_ids, self.config, pixel_values is not None,
                       np.ones(np.shape(pixel_values)[:2], bool) if several else None)
    if self.mesh is not None:
      n_batch = int(np.prod([self.mesh.shape[a] for a in sharding.BATCH_AXES]))
      if b % n_batch:
        raise ValueError(f'batch {b} is not a multiple of the mesh batch size {n_batch} (data x fsdp)')
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
    if (stop_strings or stream) and tokenizer is None:
      raise ValueError('stop_strings and stream need a tokenizer')
    eos = eos_array(eos_token_id)
    if chunk_size is None:
      chunk_size = 1 if stream else 16 if stop_strings else max_new_tokens
    statics = dict(sampling=sampling, eos=eos, pad=np.int32(pad_token_id))
    texts = [TextStream(tokenizer, stop_strings) for _ in range(b)] if tokenizer is not None else None

    with self._context():
      state = _prefill(self.model, self.params, self._place(input_ids), self._place(attention_mask),
                       self._place(pixel_values), jax.random.key(seed), max_len=prompt_len + max_new_tokens,
                       **statics)
      seen, ended = 0, np.zeros(b, bool)  # ended: EOS already pushed to the text stream
      while True:
        step, done = int(state['step']), np.asarray(state['done'])
        if texts is not None and (stream or stop_strings):
          new = np.asarray(state['tokens'][:, seen:step])
          for i, t in enumerate(texts):
            if t.stopped or ended[i]:
              continue
            row = _until_eos(new[i], eos)
            ended[i] = len(row) < len(new[i])
            delta = t.push(row)
            if stream and delta:
              stream(i, delta)
          seen = step
          stopped = np.array([t.stopped for t in texts])
          if (stopped & ~done).any():
            state['done'] = jnp.asarray(done | stopped)
            done = done | stopped
        if step >= max_new_tokens or done.all():
          break
        state = _decode(self.model, self.params, state, min(step + chunk_size, max_new_tokens), **statics)
      tokens = np.array(state['tokens'])

    lengths, reasons = np.zeros(b, np.int32), []
    for i in range(b):
      row = _until_eos(tokens[i], eos)
      reason = 'eos' if len(row) < max_new_tokens else 'length'
      if texts is not None and texts[i].stopped:
        row, reason = texts[i].ids, 'stop'
      lengths[i] = len(row)
      tokens[i, len(row):] = pad_token_id
      reasons.append(reason)
    out_texts = None
    if texts is not None:
      out_texts = []
      for i, t in enumerate(texts):
        if not t.stopped:
          t.ids = tokens[i, :lengths[i]].tolist()
          t.text = t._decode(t.ids)
        if stream:
          tail = t.flush()
          if tail:
            stream(i, tail)
        out_texts.append(t.text)
    return GenerateOutput(tokens=tokens, lengths=lengths, finish_reasons=reasons, texts=out_texts)


def _until_eos(row, eos):
  """Tokens of a row before its first EOS."""
  hits = np.nonzero(np.isin(row, eos[eos >= 0]))[0]
  return row[:hits[0]] if len(hits) else row


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens'))
def _uncached(model, params, input_ids, attention_mask, pixel_values, *, max_new_tokens, eos, pad):
  b, s = input_ids.shape
  ids = jnp.concatenate([input_ids, jnp.full((b, max_new_tokens), pad, jnp.int32)], axis=1)
  mask = jnp.concatenate([attention_mask, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)

  def body(step, carry):
    ids, mask, done = carry
    logits = model.apply({'params': params}, ids, pixel_values, attention_mask=mask)
    logits = jax.lax.dynamic_index_in_dim(logits, s + step - 1, axis=1, keepdims=False)
    tok = jnp.argmax(logits.at[:, model.config.image_token_id].set(-jnp.inf), axis=-1).astype(jnp.int32)
    tok = jnp.where(done, pad, tok)
    ids = jax.lax.dynamic_update_index_in_dim(ids, tok, s + step, axis=1)
    mask = jax.lax.dynamic_update_index_in_dim(mask, jnp.ones((b,), jnp.int32), s + step, axis=1)
    return ids, mask, done | jnp.isin(tok, eos)

  ids, _, _ = jax.lax.fori_loop(0, max_new_tokens, body, (ids, mask, jnp.zeros((b,), bool)))
  return ids[:, s:]


def generate_uncached(model, params, input_ids, attention_mask=None, pixel_values=None, *, max_new_tokens: int,
                      eos_token_id=None, pad_token_id: int = 0):
  """Greedy reference without a KV cache: every step recomputes the whole sequence (fixed size prompt +
  max_new_tokens, positions not yet generated masked out).

  For tests (cached == uncached) and the benchmark. Returns tokens [batch, max_new_tokens] (the EOS kept, pad after).
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  return np.asarray(_uncached(model, params, input_ids, mask, pixel_values, max_new_tokens=max_new_tokens,
                              eos=eos_array(eos_token_id), pad=np.int32(pad_token_id)))
