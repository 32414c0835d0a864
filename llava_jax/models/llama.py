"""LLaMA-style decoder: RMSNorm, RoPE (rotate_half), grouped-query attention, SwiGLU, optional KV cache.

Also Mistral (sliding-window attention), Llama-3.1 (llama3 rope scaling) and Qwen2 (q/k/v biases): see LlamaConfig.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from llava_jax.models.config import LlamaConfig
from llava_jax.models.layers import RMSNorm, attention, dense, logical_init, maybe_remat, rope, rope_inv_freq, swiglu
from llava_jax.models.lora import COLLECTION as LORA, LoraSpec

Array = jax.Array
Cache = dict[str, Any]


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
  """Empty KV cache for `max_len` slots.

  k, v: [layers, batch, max_len, kv_heads, head_dim]; mask: [batch, max_len] (slot holds a real token);
  index: next slot to write (shared by the batch: prompts are left-padded); next_pos: [batch] next position id.
  """
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.dim_per_head)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype), 'mask': jnp.zeros((batch, max_len), bool),
          'index': jnp.zeros((), jnp.int32), 'next_pos': jnp.zeros((batch,), jnp.int32)}


def text_inv_freq(config: LlamaConfig):
  """RoPE inverse frequencies of the decoder [head_dim / 2]."""
  c = config
  llama3 = None
  if c.rope_type == 'llama3':
    llama3 = (c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_max_position_embeddings)
  return rope_inv_freq(c.dim_per_head, c.rope_theta, llama3)


def sliding_window_mask(q_slots: Array, kv_slots: Array, window: Optional[int]) -> Optional[Array]:
  """[q_len, kv_len] True where key slot > query slot - window (HF Mistral: the last `window` positions, the query
  included); None without a window. Slots are sequence indices (prompts are left-padded, so real tokens are
  contiguous and slot distance is position distance)."""
  if window is None:
    return None
  return kv_slots[None, :] > q_slots[:, None] - window


class LlamaBlock(nn.Module):
  config: LlamaConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  lora: Optional[LoraSpec] = None

  @nn.compact
  def __call__(self, x: Array, layer_cache: Optional[Cache], positions: Array, mask: Optional[Array],
               cache_index: Optional[Array], segment_ids: Optional[Array]):
    c, dt, pdt, lo = self.config, self.dtype, self.param_dtype, self.lora
    nh, nkv, hd = c.num_heads, c.num_kv_heads, c.dim_per_head
    h = RMSNorm(c.rms_norm_eps, dt, pdt, name='input_layernorm')(x)
    q = dense((nh, hd), ('embed', 'q_heads', 'head_dim'), name='q_proj', dtype=dt, param_dtype=pdt,
              use_bias=c.qkv_bias, lora=lo)(h)
    k = dense((nkv, hd), ('embed', 'kv_heads', 'head_dim'), name='k_proj', dtype=dt, param_dtype=pdt,
              use_bias=c.qkv_bias, lora=lo)(h)
    v = dense((nkv, hd), ('embed', 'kv_heads', 'head_dim'), name='v_proj', dtype=dt, param_dtype=pdt,
              use_bias=c.qkv_bias, lora=lo)(h)
    inv_freq = text_inv_freq(c)
    q = rope(q, positions, inv_freq)
    k = rope(k, positions, inv_freq)
    new_kv = None
    if layer_cache is not None:
      # Only the new K/V leave the layer scan; the caller writes them into the stacked cache in place (carrying
      # the whole cache through the scan copies it once per layer and step).
      new_kv = {'k': k.astype(layer_cache['k'].dtype), 'v': v.astype(layer_cache['v'].dtype)}
      k = jax.lax.dynamic_update_slice_in_dim(layer_cache['k'], new_kv['k'], cache_index, 1).astype(dt)
      v = jax.lax.dynamic_update_slice_in_dim(layer_cache['v'], new_kv['v'], cache_index, 1).astype(dt)
    # Without a cache: causal self-attention (within segments when packed); with one, `mask` says it all.
    o = attention(q, k, v, mask, is_causal=layer_cache is None, segment_ids=segment_ids)
    o = dense(c.hidden_size, ('q_heads', 'head_dim', 'embed'), name='o_proj', dtype=dt, param_dtype=pdt,
              axis=(-2, -1), lora=lo)(o)
    x = x + o
    h = RMSNorm(c.rms_norm_eps, dt, pdt, name='post_attention_layernorm')(x)
    gate = dense(c.intermediate_size, ('embed', 'mlp'), name='gate_proj', dtype=dt, param_dtype=pdt, lora=lo)(h)
    up = dense(c.intermediate_size, ('embed', 'mlp'), name='up_proj', dtype=dt, param_dtype=pdt, lora=lo)(h)
    h = nn.with_logical_constraint(swiglu(gate, up), ('activation_batch', 'activation_length', 'activation_mlp'))
    h = dense(c.hidden_size, ('mlp', 'embed'), name='down_proj', dtype=dt, param_dtype=pdt, lora=lo)(h)
    x = x + h
    x = nn.with_logical_constraint(x, ('activation_batch', 'activation_length', 'activation_embed'))
    return x, new_kv


class LlamaForCausalLM(nn.Module):
  """Decoder with LM head. Params: embed_tokens, layers (stacked over layers), norm, lm_head (unless tied)."""
  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat_policy: str = 'none'
  lora: Optional[LoraSpec] = None   # LoRA factors (the `lora` collection) on the Dense layers it targets

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                 embedding_init=logical_init(nn.initializers.normal(0.02), ('vocab', 'embed')))
    block = maybe_remat(LlamaBlock, self.remat_policy)
    self.layers = nn.scan(block, variable_axes={'params': 0, LORA: 0}, split_rngs={'params': True, 'dropout': True},
                          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers,
                          metadata_params={nn.PARTITION_NAME: 'layers'})(c, self.dtype, self.param_dtype,
                                                                          self.lora)
    self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = dense(c.vocab_size, ('embed', 'vocab'), name='lm_head', dtype=self.dtype,
                           param_dtype=self.param_dtype, lora=self.lora)

  def embed(self, input_ids: Array) -> Array:
    """input_ids [batch, seq] -> [batch, seq, d_model] in compute dtype."""
    return self.embed_tokens(input_ids)

  def __call__(self, inputs_embeds: Array, attention_mask: Optional[Array] = None,
               cache: Optional[Cache] = None, *, segment_ids: Optional[Array] = None,
               positions: Optional[Array] = None, last_logits_only: bool = False):
    """inputs_embeds [batch, seq, d_model]; attention_mask [batch, seq] (1 = token, 0 = padding).

    Packed rows (no cache): segment_ids int [batch, seq] (0 = padding, 1..n = the samples of a row) confine
    attention to each sample, and positions int [batch, seq] restart at 0 for each sample (RoPE); attention_mask
    is then ignored. Returns logits [batch, seq, vocab] ([batch, 1, vocab] with last_logits_only: a prefill that
    samples one token skips the LM head elsewhere), and the updated cache when one is given.
    """
    b, s, _ = inputs_embeds.shape
    padded = attention_mask is not None and segment_ids is None
    if attention_mask is None:
      attention_mask = jnp.ones((b, s), jnp.int32)
    valid = attention_mask.astype(bool)
    steps = jnp.cumsum(valid.astype(jnp.int32), axis=1)
    layer_cache, index = None, None
    if cache is None:
      mask = valid[:, None, None, :] if padded else None
      window = sliding_window_mask(jnp.arange(s), jnp.arange(s), self.config.sliding_window)
      if window is not None:  # slot distance is position distance, within a packed sample too
        mask = window[None, None] if mask is None else mask & window[None, None]
      if positions is None:
        positions = jnp.maximum(steps - 1, 0)
    else:
      if segment_ids is not None or positions is not None:
        raise ValueError('segment_ids / positions (packed rows) are for training; decoding with a cache takes '
                         'one sample per row')
      index = cache['index']
      positions = jnp.maximum(cache['next_pos'][:, None] + steps - 1, 0)
      kv_mask = jax.lax.dynamic_update_slice_in_dim(cache['mask'], valid, index, 1)  # [b, T]
      mask = kv_mask[:, None, None, :]
      slots, q_slots = jnp.arange(kv_mask.shape[1]), index + jnp.arange(s)
      if s > 1:  # one new token attends to every filled slot (so the cache may be used as a ring, see serve/)
        mask = mask & (slots[None, :] <= q_slots[:, None])[None, None]  # [s, T]
      window = sliding_window_mask(q_slots, slots, self.config.sliding_window)
      if window is not None:  # by slot distance: needs the linear cache (a ring would wrap the slots)
        mask = mask & window[None, None]
      layer_cache = {'k': cache['k'], 'v': cache['v']}
    x = nn.with_logical_constraint(inputs_embeds.astype(self.dtype),
                                   ('activation_batch', 'activation_length', 'activation_embed'))
    x, new_kv = self.layers(x, layer_cache, positions, mask, index, segment_ids)
    x = self.norm(x[:, -1:] if last_logits_only else x)
    if self.config.tie_word_embeddings:
      logits = self.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    logits = nn.with_logical_constraint(logits, ('activation_batch', 'activation_length', 'activation_vocab'))
    if cache is None:
      return logits
    write = lambda full, new: jax.lax.dynamic_update_slice_in_dim(full, new, index, 2)  # [layers, b, T, ...]
    new_cache = {'k': write(cache['k'], new_kv['k']), 'v': write(cache['v'], new_kv['v']), 'mask': kv_mask,
                 'index': index + s, 'next_pos': cache['next_pos'] + steps[:, -1]}
    return logits, new_cache
