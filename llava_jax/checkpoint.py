"""The exported-model directory: `model_config.json` + orbax `params/` + optional `tokenizer/`.

Written by training (final export) and by `python -m llava_jax.convert import-hf`; read by chat, evals and
stage-2 initialisation. Training-time resumable checkpoints (optimizer state, data iterator) live elsewhere.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from llava_jax.models.config import LlavaConfig
from llava_jax.models.llava import abstract_params

CONFIG_FILE = 'model_config.json'


def is_model_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, 'params'))


def save_model(path: str, config: LlavaConfig, params, tokenizer=None, template: Optional[str] = None,
               image_aspect: Optional[str] = None) -> None:
  """Write params (any sharding; gathered by orbax) with their config, and the tokenizer if given.

  `template` and `image_aspect` ('square' | 'pad') record how the model was trained, for chat and evals.
  """
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(path, CONFIG_FILE), 'w') as f:
      json.dump({'model': config.to_dict(), 'template': template, 'image_aspect': image_aspect}, f, indent=2)
    if tokenizer is not None:
      tokenizer.save_pretrained(os.path.join(path, 'tokenizer'))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, 'params'), params, force=True)


def load_config(path: str) -> tuple[LlavaConfig, Optional[str]]:
  cfg_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f'{path} is not an exported llava_jax model directory: {CONFIG_FILE} is missing')
  with open(cfg_path) as f:
    d = json.load(f)
  return LlavaConfig.from_dict(d['model']), d.get('template')


def load_params(path: str, config: LlavaConfig, shardings=None, dtype=None):
  """Restore params; `shardings` (a NamedSharding tree) places them on a mesh, else on the default device."""
  target = abstract_params(config)
  if dtype is not None:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.dtype(dtype)), target)
  if shardings is not None:
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
  else:
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), target)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(os.path.abspath(path), 'params'), target)


def load_tokenizer(path: str):
  tok_dir = os.path.join(path, 'tokenizer')
  if not os.path.isdir(tok_dir):
    return None
  import transformers  # heavy import, only when a tokenizer is there
  return transformers.AutoTokenizer.from_pretrained(tok_dir)


def load_model(path: str, shardings=None, dtype=None) -> tuple[LlavaConfig, Any, Any, Optional[str]]:
  """-> (config, params, tokenizer or None, template name or None)."""
  config, template = load_config(path)
  return config, load_params(path, config, shardings, dtype), load_tokenizer(path), template
