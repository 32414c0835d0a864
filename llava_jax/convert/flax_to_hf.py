"""Export our params to an HF `LlavaForConditionalGeneration` directory (hub layout, safetensors + config.json).

The hub layout (`vision_tower.vision_model.*`, `language_model.model.*`) is what transformers 4.x expects and
5.x still reads; 5.x's own `save_pretrained` drops `vision_model.`, which 4.x would silently leave random.
HF's projector is always two Dense layers: a `linear` projector is written as linear_1 = ours, linear_2 = identity
with a linear activation (`identity`: both identity), which `load_hf_llava` folds back exactly.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import jax
import numpy as np

from llava_jax.convert import layout
from llava_jax.convert.hf_config import llava_to_hf
from llava_jax.convert.safetensors_io import SAFE_INDEX, TensorOut, write_safetensors
from llava_jax.models.config import LlavaConfig

DTYPES = ('float32', 'bfloat16', 'float16')


def _projector_tensors(config: LlavaConfig, host, dtype: np.dtype) -> list[TensorOut]:
  if config.projector == 'mlp2x_gelu':
    return []  # plain entries in the table
  d, v = config.text.hidden_size, config.vision.hidden_size
  p = layout.PROJ
  if config.projector == 'linear':
    first = [TensorOut(p + 'linear_1.weight', (d, v), dtype, lambda: host(('projector', 'linear_1', 'kernel')).T),
             TensorOut(p + 'linear_1.bias', (d,), dtype, lambda: host(('projector', 'linear_1', 'bias')))]
  else:  # identity: vision width == text width
    first = [TensorOut(p + 'linear_1.weight', (d, v), dtype, lambda: np.eye(d, dtype=dtype)),
             TensorOut(p + 'linear_1.bias', (d,), dtype, lambda: np.zeros((d,), dtype))]
  return first + [TensorOut(p + 'linear_2.weight', (d, d), dtype, lambda: np.eye(d, dtype=dtype)),
                  TensorOut(p + 'linear_2.bias', (d,), dtype, lambda: np.zeros((d,), dtype))]


def projector_tensors(config: LlavaConfig, host, dtype: np.dtype, shapes: dict) -> list[TensorOut]:
  """The projector as HF's `multi_modal_projector.*` tensors (hub names); `host(path)` gives our arrays."""
  if config.projector != 'mlp2x_gelu':
    return _projector_tensors(config, host, dtype)
  return [TensorOut(e.hf, e.hf_shape, dtype, lambda e=e: layout.to_hf(e.kind, host(e.path)))
          for e in layout.projector_entries(config, shapes)]


def export_hf_llava(out_dir: str, config: LlavaConfig, params, tokenizer=None, dtype: Optional[str] = None,
                    max_shard_bytes: int = 5 * 2**30, log: Optional[Callable[[str], None]] = None) -> list[str]:
  """Write `config.json` + safetensors (+ the tokenizer and a LlavaProcessor when `tokenizer` is given).

  params: our tree (numpy or jax arrays, any sharding). dtype: of the written tensors (default: the params').
  Returns the written weight file names.
  """
  log = log or (lambda s: None)
  cache: dict = {}

  def host(path):  # one host copy per leaf, fetched the first time it is needed
    if path not in cache:
      cache[path] = np.asarray(jax.device_get(layout.get_path(params, path)))
    return cache[path]

  dtype = dtype or str(np.asarray(jax.device_get(params['language_model']['norm']['scale'])).dtype)
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r}; allowed: {DTYPES}')
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  shapes = layout.leaf_shapes(params)
  proj = layout.projector_entries(config, shapes) if config.projector == 'mlp2x_gelu' else []
  entries = layout.vision_entries(config.vision, shapes) + proj + layout.text_entries(config.text, shapes)
  want = {(e.path, e.layer) for e in entries}
  extra = sorted('/'.join(p) for p in shapes if (p, None) not in want and (p, 0) not in want
                 and p[0] != 'projector')
  if extra:
    raise ValueError(f'params have leaves the HF layout has no place for: {extra[:20]}')

  def produce(e: layout.Entry):
    arr = host(e.path)
    return layout.to_hf(e.kind, arr if e.layer is None else arr[e.layer])

  tensors = [TensorOut(e.hf, e.hf_shape, np_dtype, lambda e=e: produce(e)) for e in entries]
  tensors += _projector_tensors(config, host, np_dtype)
  os.makedirs(out_dir, exist_ok=True)
  stale = [f for f in os.listdir(out_dir) if f.endswith('.safetensors') or f == SAFE_INDEX]
  for f in stale:  # an older export's shards or index would shadow or mix with the new weights
    os.remove(os.path.join(out_dir, f))
  if stale:
    log(f'removed {len(stale)} weight files of an earlier export in {out_dir}')
  files = write_safetensors(out_dir, tensors, max_shard_bytes, log=log)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(llava_to_hf(config, dtype, tokenizer), f, indent=2)
  if tokenizer is not None:
    _write_processor(out_dir, config, tokenizer, log)
  log(f'exported {len(tensors)} tensors ({dtype}) to {out_dir}')
  return files


def _write_processor(out_dir: str, config: LlavaConfig, tokenizer, log) -> None:
  """Tokenizer beside the weights, plus a LlavaProcessor (CLIP image preprocessing, <image> expansion): 5.x reads
  `processor_config.json`, 4.x `preprocessor_config.json`; both are written."""
  import transformers
  tokenizer.save_pretrained(out_dir)
  image_token = tokenizer.convert_ids_to_tokens(config.image_token_id) if config.image_token_id < len(tokenizer) \
      else None
  if image_token is None:
    log(f'warning: the tokenizer has no token with the image token id {config.image_token_id}; wrote the '
        'tokenizer without a LlavaProcessor')
    return
  v = config.vision
  # Without torchvision 5.x's CLIPImageProcessor falls back to this class (and warns); both serialize alike.
  image_processor_cls = getattr(transformers, 'CLIPImageProcessorPil', transformers.CLIPImageProcessor)
  image_processor = image_processor_cls(size={'shortest_edge': v.image_size},
                                        crop_size={'height': v.image_size, 'width': v.image_size})
  processor = transformers.LlavaProcessor(
      image_processor=image_processor, tokenizer=tokenizer, patch_size=v.patch_size,
      vision_feature_select_strategy='default' if v.feature_select == 'patch' else 'full',
      image_token=image_token, num_additional_image_tokens=1)
  processor.save_pretrained(out_dir)
  tok_cfg_path = os.path.join(out_dir, 'tokenizer_config.json')
  with open(tok_cfg_path) as f:
    tok_cfg = json.load(f)
  if tok_cfg.get('tokenizer_class') == 'TokenizersBackend':  # 5.x's name for a plain fast tokenizer; 4.x lacks it
    tok_cfg['tokenizer_class'] = 'PreTrainedTokenizerFast'
    with open(tok_cfg_path, 'w') as f:
      json.dump(tok_cfg, f, indent=2)
  with open(os.path.join(out_dir, 'processor_config.json')) as f:
    saved = json.load(f)
  legacy = dict(saved.get('image_processor', {}), processor_class='LlavaProcessor')
  legacy['image_processor_type'] = 'CLIPImageProcessor'
  with open(os.path.join(out_dir, 'preprocessor_config.json'), 'w') as f:
    json.dump(legacy, f, indent=2)
  log(f'wrote tokenizer and LlavaProcessor (image token {image_token!r} = id {config.image_token_id})')
