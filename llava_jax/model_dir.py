"""Model directories: ours (`model_config.json` + orbax `params/` + `tokenizer/`) or a HF one, and their tokenizer.

Ours is written by training (the final export) and by `python -m llava_jax.convert import-hf`. This module is the
one place that reads a model directory, for inference, for a stage's initialisation and for conversion: exported
or HF, the tokenizer beside it, and the check that the two belong together (`<image>` id, vocabulary size).
Training's resumable checkpoints (optimizer state, data position) are `llava_jax/train/resume.py`.

    m = load_model('runs/s2/model')          # or a HF LLaVA dir; m.config, m.params, m.tokenizer, m.template
    parts = read_params('hf/vicuna-7b-v1.5', ('language_model',))
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from llava_jax.data.tokenize import ImageTokens, add_image_token
from llava_jax.models.config import LlavaConfig
from llava_jax.models.llava import abstract_params

CONFIG_FILE = 'model_config.json'
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json')
MODULES = ('vision_tower', 'projector', 'language_model')


class TokenizerMismatch(ValueError):
  """The tokenizer cannot drive the model: no `<image>` token, another id, or more tokens than the vocabulary."""


@dataclasses.dataclass
class LoadedModel:
  config: LlavaConfig
  params: Any
  tokenizer: Any                     # checked against `config`; None when the directory has none
  template: Optional[str] = None     # recorded at export (None for HF dirs)
  image_aspect: Optional[str] = None  # 'square' | 'pad', recorded at export


def is_model_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, 'params'))


def is_hf_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, 'config.json'))


# ------------------------------------------------------------------------------------------------ our format

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


def _read_meta(path: str) -> dict:
  cfg_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f'{path} is not an exported llava_jax model directory: {CONFIG_FILE} is missing')
  with open(cfg_path) as f:
    return json.load(f)


def load_config(path: str) -> tuple[LlavaConfig, Optional[str]]:
  """(model config, template name or None) of an exported model directory."""
  meta = _read_meta(path)
  return LlavaConfig.from_dict(meta['model']), meta.get('template')


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


# ------------------------------------------------------------------------------------------------ tokenizer

def load_tokenizer(path: str):
  """The tokenizer of an exported model dir (its `tokenizer/`) or of a HF dir; None when there is none."""
  if is_model_dir(path):
    path = os.path.join(path, 'tokenizer')
    if not os.path.isdir(path):
      return None
  elif not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
    return None
  import transformers  # heavy import, only when a tokenizer is there
  return transformers.AutoTokenizer.from_pretrained(path)


def check_tokenizer(tokenizer, config: LlavaConfig, where: str, *, missing_image_token: str = 'error') -> None:
  """Raise TokenizerMismatch unless `tokenizer` drives the model of `config`.

  The image token is `<image>`, or `<im_patch>` for mm_use_im_patch_token models; mm_use_im_start_end models
  also need `<im_start>` / `<im_end>` (tokenize.ImageTokens). missing_image_token: 'error'; 'add' (add the
  missing ones as the next ids, as llava-hf's conversion and the original's initialize_vision_tokenizer do);
  'ignore' (only the vocabulary size is checked).
  """
  layout = ImageTokens.of(config)
  if missing_image_token == 'add':
    for token in layout.special_tokens:
      add_image_token(tokenizer, token)
  added = tokenizer.get_added_vocab()
  token = layout.token
  if token in added and added[token] != config.image_token_id:
    raise TokenizerMismatch(f'{where}: the tokenizer maps {token!r} to id {added[token]} but the model '
                            f'expects {config.image_token_id} (image_token_id): checkpoint/tokenizer mismatch')
  if token not in added and missing_image_token != 'ignore':
    raise TokenizerMismatch(f'{where}: the tokenizer has no {token!r} token; it does not belong to this '
                            f'LLaVA model (expected image_token_id {config.image_token_id})')
  lacking = [t for t in layout.special_tokens[1:] if t not in added]
  if lacking and missing_image_token != 'ignore':
    raise TokenizerMismatch(f'{where}: the tokenizer has no {lacking} tokens, which the model uses '
                            '(mm_use_im_start_end)')
  if len(tokenizer) > config.text.vocab_size:
    raise TokenizerMismatch(f'{where}: the tokenizer has {len(tokenizer)} tokens but the model vocabulary is '
                            f'{config.text.vocab_size} (text.vocab_size): checkpoint/tokenizer mismatch')


# ------------------------------------------------------------------------------------------------ either kind

def _is_hf_llava(path: str) -> bool:
  if not is_hf_dir(path):
    return False
  with open(os.path.join(path, 'config.json')) as f:
    return json.load(f).get('model_type') == 'llava'


def read_params(path: str, modules=MODULES) -> dict[str, Any]:
  """Param subtrees {module: tree} of `modules` from an exported dir, a HF LLaVA dir, or (for one module) a HF
  CLIP (`vision_tower`) or LLaMA (`language_model`) dir. Leaves as stored (host or device arrays)."""
  modules = tuple(modules)
  if is_model_dir(path):
    params = load_params(path, load_config(path)[0])
  elif is_hf_dir(path):
    from llava_jax import convert  # reads large files: only when asked for
    if modules == ('vision_tower',) and not _is_hf_llava(path):
      params = {'vision_tower': convert.load_hf_clip(path)[1]}
    elif modules == ('language_model',) and not _is_hf_llava(path):
      params = {'language_model': convert.load_hf_llama(path)[1]}
    else:
      params = convert.load_hf_llava(path)[1]
  else:
    raise FileNotFoundError(f'{path} is neither an exported llava_jax model (model_config.json + params/) nor a '
                            'HF model directory (config.json)')
  missing = [m for m in modules if m not in params]
  if missing:
    raise ValueError(f'{path} has no {missing} params')
  return {m: params[m] for m in modules}


def load_model(path: str, *, tokenizer_path: Optional[str] = None, dtype: Optional[str] = None, mesh=None,
               shardings=None, require_tokenizer: bool = False, adapter: Optional[str] = None) -> LoadedModel:
  """An exported model dir or a HF LLaVA dir -> LoadedModel, its tokenizer checked against its config.

  `tokenizer_path` replaces the directory's own tokenizer. `mesh` (exported dirs) restores the params straight
  onto it with the sharding rules; `shardings` gives the NamedSharding tree instead. `adapter`: a PEFT LoRA
  adapter dir for this base (convert/peft.py), merged into the params.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint directory not found: {path}')
  if is_model_dir(path):
    meta = _read_meta(path)
    config = LlavaConfig.from_dict(meta['model'])
    if mesh is not None and shardings is None:
      from llava_jax import sharding
      from llava_jax.models.llava import param_logical_axes
      shardings = sharding.logical_to_mesh(param_logical_axes(config), abstract_params(config), mesh)
    params = load_params(path, config, shardings, dtype)
    template, image_aspect = meta.get('template'), meta.get('image_aspect')
  elif is_hf_dir(path):
    from llava_jax.convert import load_hf_llava
    model, params = load_hf_llava(path, dtype=dtype)
    config, template, image_aspect = model.config, None, None
  else:
    raise FileNotFoundError(f'{path} is neither an exported llava_jax model dir (model_config.json + params/) '
                            'nor an HF LLaVA dir (config.json)')
  if adapter is not None:  # a PEFT LoRA adapter for this base: merged in once, then a plain model
    from llava_jax.convert import peft as peft_io
    params = peft_io.apply_adapter(params, config, adapter)
  tokenizer = load_tokenizer(tokenizer_path or path)
  if tokenizer is None and (tokenizer_path or require_tokenizer):
    raise FileNotFoundError(f'{tokenizer_path or path} holds no tokenizer ({", ".join(TOKENIZER_FILES)}); '
                            'pass one with --tokenizer DIR')
  if tokenizer is not None:
    check_tokenizer(tokenizer, config, tokenizer_path or path)
  return LoadedModel(config, params, tokenizer, template, image_aspect)
