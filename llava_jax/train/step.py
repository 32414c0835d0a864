"""The train step: a pure function `(state, frozen, batch) -> (state, metrics)`, and its jit with shardings.

Only `state.params` (the trainable subtree, fp32 master weights) is differentiated; `frozen` (compute dtype) is a
constant of the step. Gradients of the summed token losses are accumulated over `grad_accum_steps` micro-batches
and divided once by the number of supervised tokens of the whole global batch, so accumulation and data
parallelism give the same update as one big batch.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from llava_jax.data.tokenize import IGNORE_INDEX
from llava_jax.models import lora as lora_lib
from llava_jax.train import partition

Batch = dict[str, jax.Array]
# Keys that packed batches add (see make_train_step); unpacked batches have none of them.
PACKED_KEYS = ('segment_ids', 'positions', 'image_valid')


@flax.struct.dataclass
class TrainState:
  step: jax.Array   # int32 [], train steps taken (batches consumed, non-finite skipped ones included)
  params: Any       # trainable subtree, fp32
  opt_state: Any


def supervised_targets(labels: jax.Array, segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """bool [batch, seq - 1]: position t is trained to predict labels[t + 1].

  Packed rows: never across a segment boundary (the data already gives each sample's first token the ignore
  label; this holds whatever the labels say).
  """
  mask = labels[:, 1:] != IGNORE_INDEX
  if segment_ids is not None:
    mask &= (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
  return mask


def next_token_loss(logits: jax.Array, labels: jax.Array,
                    segment_ids: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy and the count of supervised tokens.

  logits [batch, seq, vocab] (any dtype; reduced in fp32); labels [batch, seq] unshifted like HF (-100 = ignore):
  position t predicts labels[t + 1]; segment_ids [batch, seq] of packed rows, or None.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = labels[:, 1:]
  mask = supervised_targets(labels, segment_ids)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, lse - picked, 0.0)), jnp.sum(mask, dtype=jnp.float32)


def batch_work(batch: Batch, image_token_id: int) -> dict[str, jax.Array]:
  """What a batch asks of the model, padding excluded (fp32 scalars; jnp, so on device or host arrays):
  real_tokens (non-padding), samples, images (images that samples use), attention_pairs (sum over samples of
  length^2: the per-sample attention context that flops.py counts).
  """
  if 'segment_ids' in batch:
    real = batch['segment_ids'] > 0
    pos = batch['positions']
  else:
    real = batch['attention_mask'] > 0
    pos = jnp.cumsum(real, axis=1) - 1
  f32 = lambda x: jnp.sum(x, dtype=jnp.float32)
  if batch['pixel_values'].ndim == 5:
    images = f32(batch['image_valid'])
  else:
    images = f32(jnp.any(batch['input_ids'] == image_token_id, axis=1))
  # A sample of L tokens at positions 0..L-1: sum of (2 p + 1) = L^2.
  return {'real_tokens': f32(real), 'samples': f32(real & (pos == 0)), 'images': images,
          'attention_pairs': f32(jnp.where(real, 2 * pos + 1, 0))}


def make_train_step(model, tx: optax.GradientTransformation, lr_schedule: Callable,
                    grad_accum_steps: int = 1, dropout_seed: int = 0) -> Callable:
  """Build `train_step(state, frozen, batch) -> (state, metrics)`.

  batch: input_ids / labels / attention_mask int32 [global_batch, seq], pixel_values float32
  [global_batch, H, W, 3]. Packed rows add segment_ids / positions int32 [global_batch, seq], and their
  pixel_values are [global_batch, slots, H, W, 3] with image_valid bool [global_batch, slots].
  metrics: loss (mean over supervised tokens), grad_norm, lr, tokens (supervised), finite (0/1; on a non-finite
  loss or gradient the state is returned unchanged), and the work of the batch (batch_work). LoRA dropout
  (model.lora) draws from (dropout_seed, step, micro-batch): a resumed run repeats it exactly.
  """
  lora = getattr(model, 'lora', None)
  dropout = lora is not None and lora.dropout > 0

  def summed_loss(params, frozen, mb, key):
    packed = {k: mb[k] for k in PACKED_KEYS if k in mb}
    rngs = {'dropout': key} if dropout else {}
    logits = model.apply(lora_lib.variables(partition.merge(params, frozen)), mb['input_ids'], mb['pixel_values'],
                         mb['attention_mask'], **packed, rngs=rngs)
    return next_token_loss(logits, mb['labels'], mb.get('segment_ids'))[0]

  grad_fn = jax.value_and_grad(summed_loss)

  def train_step(state: TrainState, frozen, batch: Batch):
    # The loss is summed over supervised tokens and divided once by their count in the global batch.
    n_tokens = jnp.sum(supervised_targets(batch['labels'], batch.get('segment_ids')), dtype=jnp.float32)
    inputs = {k: batch[k] for k in ('input_ids', 'labels', 'attention_mask', 'pixel_values', *PACKED_KEYS)
              if k in batch}
    key = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
    if grad_accum_steps == 1:
      loss_sum, grads = grad_fn(state.params, frozen, inputs, key)
    else:
      # Micro-batch a takes rows a, a+k, a+2k, ... so that every data shard contributes to every micro-batch.
      def to_micro(x):
        x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

      def body(carry, mb_i):
        loss_acc, grad_acc = carry
        mb, i = mb_i
        loss_sum, grads = grad_fn(state.params, frozen, mb, jax.random.fold_in(key, i))
        return (loss_acc + loss_sum, jax.tree.map(jnp.add, grad_acc, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss_sum, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                          (jax.tree.map(to_micro, inputs), jnp.arange(grad_accum_steps)))
    denom = jnp.maximum(n_tokens, 1.0)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step never reaches the state (so it can never be checkpointed); the host decides stop or skip.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state))
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': lr_schedule(state.step), 'tokens': n_tokens,
               'finite': finite.astype(jnp.int32), **batch_work(batch, model.config.image_token_id)}
    return new_state, metrics

  return train_step
