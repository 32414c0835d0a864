"""LLaVA: CLIP vision tower -> projector W -> LLaMA decoder, with image features spliced at image-token positions."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.models import llama
from llava_jax.models.clip import CLIPVisionTower
from llava_jax.models.config import LlavaConfig
from llava_jax.models.layers import dtype_of
from llava_jax.models.llama import LlamaForCausalLM
from llava_jax.models.lora import COLLECTION as LORA, LoraSpec
from llava_jax.models.projector import Projector

Array = jax.Array


def check_image_tokens(input_ids, config: LlavaConfig, has_pixels: bool = True, image_valid=None) -> np.ndarray:
  """Host-side check of the image tokens. Returns the per-row counts of image tokens.

  One image per row (image_valid None): each row has 0 or exactly N image tokens. Image slots (image_valid bool
  [batch, slots]): each row has N image tokens per image, at most as many images as valid slots.
  """
  counts = (np.asarray(input_ids) == config.image_token_id).sum(axis=-1)
  n = config.num_image_tokens
  if image_valid is None:
    bad = np.nonzero((counts != 0) & (counts != n))[0]
    if bad.size:
      raise ValueError(f'samples {bad.tolist()} have {counts[bad].tolist()} image tokens (id {config.image_token_id});'
                       f' each sample needs 0 or exactly {n} (= num_image_tokens)')
  else:
    slots = np.asarray(image_valid).sum(axis=-1)
    bad = np.nonzero((counts % n != 0) | (counts // n > slots))[0]
    if bad.size:
      raise ValueError(f'rows {bad.tolist()} have {counts[bad].tolist()} image tokens (id {config.image_token_id}) '
                       f'for {slots[bad].tolist()} valid image slots; each row needs {n} (= num_image_tokens) per '
                       'image and at most one image per valid slot')
  if not has_pixels and counts.any():
    raise ValueError(f'samples {np.nonzero(counts)[0].tolist()} have image tokens but pixel_values is None')
  return counts


class Llava(nn.Module):
  """Called like transformers' LlavaForConditionalGeneration.

  input_ids [batch, seq] with each image as N copies of `image_token_id`; attention_mask [batch, seq].
  pixel_values, one image per row: [batch, H, W, 3] (image i belongs to row i; ignored by rows without image
  tokens), or None for a text-only batch. Several images per row: [batch, slots, H, W, 3] with image_valid bool
  [batch, slots]; image j of a row fills the j-th run of N image tokens of that row (packed rows, multi-image
  samples). Packed rows also give segment_ids and positions (see LlamaForCausalLM).
  Returns logits [batch, seq, vocab] (and the new cache when `cache` is given).
  `lora`: LoRA on the decoder's Dense layers it targets (models/lora.py; apply with `lora.variables(params)`).
  """
  config: LlavaConfig
  lora: Optional[LoraSpec] = None

  def setup(self):
    c = self.config
    dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
    self.vision_tower = CLIPVisionTower(c.vision, dt, pdt, c.remat_policy)
    self.projector = Projector(c.projector, c.text.hidden_size, dt, pdt)
    self.language_model = LlamaForCausalLM(c.text, dt, pdt, c.remat_policy, self.lora)

  def encode_images(self, pixel_values: Array) -> Array:
    """pixel_values [batch, H, W, 3] -> image_features [batch, N, d_model]."""
    return self.projector(self.vision_tower(pixel_values))

  def __call__(self, input_ids: Array, pixel_values: Optional[Array] = None,
               attention_mask: Optional[Array] = None, cache: Optional[llama.Cache] = None, *,
               segment_ids: Optional[Array] = None, positions: Optional[Array] = None,
               image_valid: Optional[Array] = None, last_logits_only: bool = False):
    c = self.config
    slots = pixel_values is not None and pixel_values.ndim == 5
    if slots and image_valid is None:
      image_valid = jnp.ones(pixel_values.shape[:2], bool)
    if not isinstance(input_ids, jax.core.Tracer) and not isinstance(image_valid, jax.core.Tracer):
      check_image_tokens(input_ids, c, pixel_values is not None, image_valid if slots else None)
    is_image = input_ids == c.image_token_id
    embeds = self.language_model.embed(jnp.where(is_image, 0, input_ids))
    if pixel_values is not None:
      b = pixel_values.shape[0]
      # Every slot runs the vision tower (a fixed shape); invalid slots come after the valid ones of their row
      # and no image token points at them.
      features = self.encode_images(pixel_values.reshape(-1, *pixel_values.shape[-3:]) if slots else pixel_values)
      features = features.reshape(b, -1, features.shape[-1]).astype(embeds.dtype)  # [b, slots * N, d]
      # k-th image token of a row takes the k-th feature of that row's images, in slot order.
      idx = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
      gathered = jnp.take_along_axis(features, idx[..., None], axis=1)
      embeds = jnp.where(is_image[..., None], gathered, embeds)
    return self.language_model(embeds, attention_mask, cache, segment_ids=segment_ids, positions=positions,
                               last_logits_only=last_logits_only)


def init_cache(config: LlavaConfig, batch: int, max_len: int, dtype=None) -> llama.Cache:
  return llama.init_cache(config.text, batch, max_len, dtype_of(config.dtype) if dtype is None else dtype)


def _dummy_inputs(config: LlavaConfig, batch: int = 1):
  v = config.vision
  return (jnp.zeros((batch, 4), jnp.int32), jnp.zeros((batch, v.image_size, v.image_size, 3), jnp.float32))


def init_params(config: LlavaConfig, rng: Array, boxed: bool = False, lora: Optional[LoraSpec] = None):
  """Random params as a plain pytree {'vision_tower', 'projector', 'language_model'} (boxed=True keeps axis names),
  with `lora` also {'lora': factors} (A random, B zero)."""
  ids, pix = _dummy_inputs(config)
  variables = Llava(config, lora).init(rng, ids, pix)
  params = dict(variables['params'])
  if LORA in variables:
    params[LORA] = variables[LORA]
  return params if boxed else nn.meta.unbox(params)


def abstract_params(config: LlavaConfig, lora: Optional[LoraSpec] = None):
  """ShapeDtypeStructs of the params, without allocating them."""
  return nn.meta.unbox(jax.eval_shape(lambda r: init_params(config, r, boxed=True, lora=lora), jax.random.key(0)))


def param_logical_axes(config: LlavaConfig, lora: Optional[LoraSpec] = None):
  """Pytree (same structure as params) of PartitionSpecs over logical axis names."""
  boxed = jax.eval_shape(lambda r: init_params(config, r, boxed=True, lora=lora), jax.random.key(0))
  return nn.get_partition_spec(boxed)
