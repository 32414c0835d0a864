"""A model ready to answer: the sampler, tokenizer, template and image preprocessing of one model directory.

    im = load_inference_model('runs/s2/model')      # exported llava_jax dir or HF LLaVA dir (model_dir.load_model)
    ids = prompt_ids(im, [{'from': 'human', 'value': '<image>\\nWhat is this?'}])
    out = generate_batch(im, [ids], [load_pixels(im, 'photo.jpg')], max_new_tokens=64, sampling=SamplingParams())

Used by chat and the evals.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import numpy as np

from llava_jax import model_dir
from llava_jax.data import conversation, image as image_lib, tokenize
from llava_jax.generate import Sampler, SamplingParams, pad_batch

DEFAULT_TEMPLATE = 'vicuna_v1'


@dataclasses.dataclass
class InferenceModel:
  sampler: Sampler
  tokenizer: Any
  template: str
  image_aspect: str
  path: str

  @property
  def config(self):
    return self.sampler.config


def load_inference_model(path: str, *, tokenizer_path: Optional[str] = None, template: Optional[str] = None,
                         image_aspect: Optional[str] = None, dtype: Optional[str] = None,
                         mesh=None, adapter: Optional[str] = None) -> InferenceModel:
  """A model directory (see `model_dir.load_model`) -> InferenceModel.

  Template: argument, else the one saved with the model, else 'vicuna_v1'. Image aspect: argument, else the one
  saved with the model, else 'square'. `adapter`: a PEFT LoRA adapter dir merged into the base (model_dir).
  """
  m = model_dir.load_model(path, tokenizer_path=tokenizer_path, dtype=dtype, mesh=mesh, require_tokenizer=True,
                           adapter=adapter)
  template = template or m.template or DEFAULT_TEMPLATE
  tokenize.check_template_tokens(m.tokenizer, template, tokenizer_path or path)  # also names the allowed templates
  image_aspect = image_aspect or m.image_aspect or 'square'
  if image_aspect not in image_lib.ASPECTS:
    raise ValueError(f'image aspect {image_aspect!r}; allowed: {image_lib.ASPECTS}')
  from llava_jax.models.llava import Llava
  return InferenceModel(Sampler(Llava(m.config), m.params, mesh=mesh), m.tokenizer, template, image_aspect, path)


def stop_strings_for(template: str) -> tuple[str, ...]:
  """Text that ends an answer besides EOS: the turn separator of `###` / plain / ChatML-style templates (as the
  original)."""
  t = conversation.get_template(template)
  if t.style == 'single':
    return (t.sep,)
  if t.style == 'plain':
    return ('\n',)
  if t.style == 'mpt':  # the turn end (<|im_end|>, <|eot_id|>) may not be the tokenizer's EOS
    return (t.stop,)
  return ()


def prompt_ids(im: InferenceModel, messages) -> np.ndarray:
  """LLaVA JSON turns ending with a user turn -> generation-prompt token ids int32[n]."""
  return tokenize.tokenize_prompt(messages, im.tokenizer, im.template, tokenize.ImageTokens.of(im.config))


def load_pixels(im: InferenceModel, path: str) -> np.ndarray:
  """Image file -> float32 [H, W, 3] preprocessed for this model."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'image not found: {path}')
  return image_lib.preprocess_image(image_lib.load_image(path), im.config.vision.image_size, im.image_aspect)


def generate_batch(im: InferenceModel, prompts, pixels, *, max_new_tokens: int, sampling: SamplingParams,
                   seed: int = 0, batch_size: Optional[int] = None, stream=None, pad_multiple: int = 64):
  """Token-id prompts (+ per-prompt pixels: [H, W, 3], [images, H, W, 3] for a prompt with several `<image>`s,
  or None) -> GenerateOutput for the real prompts.

  Prompts are left-padded to a multiple of `pad_multiple` and the batch is filled up to `batch_size` with copies
  of the first prompt, so a run compiles only a few shapes. With several images the batch takes image slots
  [batch, most images, H, W, 3] (image j of a prompt fills its j-th run of image tokens).
  """
  n = len(prompts)
  batch_size = max(batch_size or n, n)
  prompts = list(prompts) + [prompts[0]] * (batch_size - n)
  pixels = list(pixels) + [pixels[0]] * (batch_size - n)
  tok = im.tokenizer
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
  ids, mask = pad_batch(prompts, pad_id, pad_multiple)
  size = im.config.vision.image_size
  images = [[] if p is None else list(p) if np.ndim(p) == 4 else [p] for p in pixels]
  slots = max(len(x) for x in images)
  if slots <= 1 and all(p is None or np.ndim(p) == 3 for p in pixels):
    pixel_values = np.stack([x[0] if x else image_lib.blank_image(size) for x in images])
  else:
    pixel_values = np.stack([np.stack(x + [image_lib.blank_image(size)] * (slots - len(x))) for x in images])
  out = im.sampler(ids, mask, pixel_values, max_new_tokens=max_new_tokens, sampling=sampling,
                   eos_token_id=tok.eos_token_id, pad_token_id=pad_id, stop_strings=stop_strings_for(im.template),
                   tokenizer=tok, seed=seed, stream=stream)
  out.tokens, out.lengths = out.tokens[:n], out.lengths[:n]
  out.finish_reasons, out.texts = out.finish_reasons[:n], out.texts[:n]
  return out
