"""Import HF checkpoints (CLIP, LLaMA, HF LLaVA, original-release LLaVA) into our param tree.

Params are numpy arrays allocated once at their final shape and dtype; each HF tensor is read, transposed and cast
straight into its slot (layers into the stacked arrays), then dropped. Peak host memory is therefore one copy of
the params plus the largest single tensor. Every key is checked before anything is read: missing, unexpected
and mis-shaped tensors are reported together in one error.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.convert import layout
from llava_jax.convert.hf_config import (TEXT_MODEL_TYPES, image_layout_of, llava_from_hf, original_projector,
                                         read_json, text_from_hf, vision_from_hf)
from llava_jax.convert.safetensors_io import TensorRef, open_checkpoint
from llava_jax.data.tokenize import IM_PATCH
from llava_jax.models.clip import CLIPVisionTower
from llava_jax.models.config import LlamaConfig, LlavaConfig, VisionConfig
from llava_jax.models.llama import LlamaForCausalLM
from llava_jax.models.llava import Llava, abstract_params

Log = Optional[Callable[[str], None]]
PARAM_DTYPES = ('float32', 'bfloat16', 'float16')


class CheckpointMismatchError(ValueError):
  """The checkpoint's tensors do not match what the config says the model has."""


def _rename(refs: dict[str, TensorRef], fn, where: str) -> tuple[dict[str, TensorRef], list[str]]:
  out, ignored = {}, []
  for name, ref in refs.items():
    new = None if layout.is_ignored(name) else fn(name)
    if new is None:
      ignored.append(name)
      continue
    if new in out:
      raise CheckpointMismatchError(f'{where}: tensors {out[new].name} and {name} are the same weight')
    out[new] = ref
  return out, ignored


def _merge(*parts: dict[str, TensorRef]) -> dict[str, TensorRef]:
  out: dict[str, TensorRef] = {}
  for part in parts:
    for name, ref in part.items():
      if name in out:
        raise CheckpointMismatchError(f'weight {name} is given twice: {out[name].source} and {ref.source}')
      out[name] = ref
  return out


def _listing(title: str, items: list[str], limit: int = 25) -> str:
  more = f' ... and {len(items) - limit} more' if len(items) > limit else ''
  return f'\n  {title} ({len(items)}): ' + ', '.join(items[:limit]) + more


def check_keys(source: dict[str, TensorRef], entries: list[layout.Entry], where: str) -> None:
  """One error listing every missing, unexpected and mis-shaped tensor."""
  expected = {e.hf: e for e in entries}
  missing = sorted(set(expected) - set(source))
  unexpected = sorted(f'{k} [{source[k].source}]' for k in set(source) - set(expected))
  misshaped = sorted(f'{k}: checkpoint {source[k].shape}, expected {e.hf_shape}'
                     for k, e in expected.items() if k in source and tuple(source[k].shape) != tuple(e.hf_shape))
  if missing or unexpected or misshaped:
    msg = f'{where}: checkpoint does not match the model config (nothing was loaded)'
    for title, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)):
      if items:
        msg += _listing(title, items)
    raise CheckpointMismatchError(msg)


def _check_coverage(entries: list[layout.Entry], shapes: dict) -> None:
  """Every leaf (every layer of stacked leaves) must be written by some entry: no random init sneaks through."""
  filled = {(e.path, e.layer) for e in entries}
  stacked = {e.path for e in entries if e.layer is not None}
  uncovered = []
  for path, shape in shapes.items():
    need = [(path, i) for i in range(shape[0])] if path in stacked else [(path, None)]
    uncovered += ['/'.join(p) + ('' if i is None else f'[{i}]') for p, i in need if (p, i) not in filled]
  if uncovered:
    raise AssertionError(f'internal: the name table leaves params unset: {uncovered[:20]}')


def fold_linear(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """HF's linear_2(linear_1(x)) with a linear activation -> one Dense (kernel [in, out], bias [out]).

  Exact when linear_2 is the identity with zero bias (what our export writes); otherwise folded in float64.
  """
  if np.array_equal(w2, np.eye(w2.shape[0], dtype=w2.dtype)) and not np.any(b2):
    return w1.T, b1
  w1, b1, w2, b2 = (np.asarray(a, np.float64) for a in (w1, b1, w2, b2))
  return (w2 @ w1).T, w2 @ b1 + b2


def _fill(source: dict[str, TensorRef], entries: list[layout.Entry], shapes: dict, dtype: str, log: Log,
          where: str) -> dict:
  check_keys(source, entries, where)
  _check_coverage(entries, shapes)
  params: dict = {}
  for path, shape in shapes.items():
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = np.empty(shape, np.dtype(jnp.dtype(dtype)))
  fold = {}
  for n, e in enumerate(entries):
    src = source[e.hf].load()
    if e.kind == 'fold':
      fold[e.hf[len(layout.PROJ):]] = src
      continue
    dst = layout.get_path(params, e.path)
    if e.layer is not None:
      dst = dst[e.layer]
    rows = e.hf_shape[0]
    if e.path[-1] == 'embedding' and dst.shape[0] > rows:
      # Vocab grown by the import (image token appended): new rows = mean of the old ones, as llava-hf did.
      dst[:rows] = src
      dst[rows:] = src.astype(np.float32).mean(0)
    elif e.path[-2:] == ('lm_head', 'kernel') and dst.shape[1] > rows:
      dst[:, :rows] = src.T
      dst[:, rows:] = src.astype(np.float32).mean(0)[:, None]
    else:
      layout.to_flax(e.kind, src, dst)
    del src
    if log and (n + 1) % 50 == 0:
      log(f'  converted {n + 1}/{len(entries)} tensors')
  if fold:
    kernel, bias = fold_linear(fold['linear_1.weight'], fold['linear_1.bias'], fold['linear_2.weight'],
                               fold['linear_2.bias'])
    params['projector']['linear_1']['kernel'][...] = kernel
    params['projector']['linear_1']['bias'][...] = bias
  if log:
    log(f'  converted {len(entries)} tensors')
  return params


def _pick_dtype(dtype: Optional[str], source: dict[str, TensorRef], key: str, where: str) -> str:
  """Requested dtype, else the checkpoint's own (that of tensor `key`; float32 when it is not one we store)."""
  if not source:
    raise CheckpointMismatchError(f'{where}: the checkpoint holds no weights')
  ref = source.get(key, next(iter(source.values())))
  if dtype is not None:
    if dtype not in PARAM_DTYPES:
      raise ValueError(f'dtype={dtype!r}; allowed: {PARAM_DTYPES}')
    return dtype
  name = str(ref.dtype)
  return name if name in PARAM_DTYPES else 'float32'


def _log_ignored(log: Log, ignored: list[str], what: str):
  if log and ignored:
    log(f'  ignored {len(ignored)} tensors ({what}), e.g. {ignored[:3]}')


def _shapes_of(module: nn.Module, *args, method=None) -> dict:
  tree = jax.eval_shape(lambda r: module.init(r, *args, method=method), jax.random.key(0))['params']
  return layout.leaf_shapes(nn.meta.unbox(tree))


# ----------------------------------------------------------------------------------------------------------------
# CLIP and LLaMA on their own (the two halves of a stage-1 model)


def clip_source(path: str, log: Log = None) -> dict[str, TensorRef]:
  source, ignored = _rename(open_checkpoint(path), layout.canonical_clip, path)
  _log_ignored(log, ignored, 'CLIP text tower, projections and buffers')
  return source


def load_hf_clip(path: str, *, feature_layer: int = -2, feature_select: str = 'patch', dtype: Optional[str] = None,
                 log: Log = None) -> tuple[VisionConfig, dict]:
  """CLIP checkpoint dir (CLIPModel, or CLIPVisionModel in 4.x / 5.x layout) -> (VisionConfig, vision_tower params)."""
  import transformers
  config = vision_from_hf(transformers.CLIPVisionConfig.from_pretrained(path), path, feature_layer, feature_select)
  source = clip_source(path, log)
  dtype = _pick_dtype(dtype, source, layout.VISION + 'embeddings.patch_embedding.weight', path)
  v = config
  shapes = _shapes_of(CLIPVisionTower(v), jnp.zeros((1, v.image_size, v.image_size, 3)))
  shapes = {('vision_tower',) + p: s for p, s in shapes.items()}
  params = _fill(source, layout.vision_entries(config, shapes), shapes, dtype, log, path)
  return config, params['vision_tower']


def load_hf_llama(path: str, *, dtype: Optional[str] = None, log: Log = None) -> tuple[LlamaConfig, dict]:
  """Llama / Mistral / Qwen2 ForCausalLM checkpoint dir -> (LlamaConfig, language_model params)."""
  import transformers
  config = text_from_hf(transformers.AutoConfig.from_pretrained(path), path)
  source, ignored = _rename(open_checkpoint(path), layout.canonical_llama, path)
  if config.tie_word_embeddings and layout.LM_HEAD in source:
    ignored.append(source.pop(layout.LM_HEAD).name)
  _log_ignored(log, ignored, 'buffers / tied lm_head')
  dtype = _pick_dtype(dtype, source, layout.TEXT + 'embed_tokens.weight', path)
  shapes = _shapes_of(LlamaForCausalLM(config), jnp.zeros((1, 2), jnp.int32), method=lambda m, ids: m(m.embed(ids)))
  shapes = {('language_model',) + p: s for p, s in shapes.items()}
  params = _fill(source, layout.text_entries(config, shapes), shapes, dtype, log, path)
  return config, params['language_model']


# ----------------------------------------------------------------------------------------------------------------
# Full LLaVA


def load_hf_llava(path: str, *, dtype: Optional[str] = None, vision_tower: Optional[str] = None,
                  mm_projector: Optional[str] = None, image_token_id: Optional[int] = None,
                  log: Log = None) -> tuple[Llava, dict]:
  """A LLaVA checkpoint dir -> (Llava module, params as numpy arrays).

  HF `LlavaForConditionalGeneration` dirs (transformers 4.x hub layout or 5.x layout) are read directly. An
  original-release dir (config.json with `mm_*` keys), or any LLaMA dir when `vision_tower` / `mm_projector` is
  given, goes to `load_original_llava`. `dtype` (float32 | bfloat16 | float16) defaults to the checkpoint's.
  """
  raw = read_json(path)
  if vision_tower or mm_projector or ('text_config' not in raw and original_projector(raw) is not None):
    return load_original_llava(path, vision_tower=vision_tower, mm_projector=mm_projector, dtype=dtype,
                               image_token_id=image_token_id, log=log)
  if 'text_config' not in raw or 'vision_config' not in raw:
    raise ValueError(f'{path}: config.json is neither an HF LLaVA config (text_config + vision_config) nor an '
                     'original-release one (mm_* keys); for a LLaMA dir pass vision_tower= (and mm_projector=), '
                     'for CLIP / LLaMA alone use load_hf_clip / load_hf_llama')
  import transformers
  hc = transformers.LlavaConfig.from_pretrained(path)
  source, ignored = _rename(open_checkpoint(path), layout.canonical_llava, path)
  dtype = _pick_dtype(dtype, source, layout.TEXT + 'embed_tokens.weight', path)
  config, fold = llava_from_hf(hc, path, dtype)
  if image_token_id is not None and image_token_id != config.image_token_id:
    raise ValueError(f'{path}: image_token_id={image_token_id} but config.json says {config.image_token_id}')
  if config.text.tie_word_embeddings and layout.LM_HEAD in source:
    ignored.append(source.pop(layout.LM_HEAD).name)
  _log_ignored(log, ignored, 'buffers / tied lm_head')
  if log:
    log(f'{path}: HF LLaVA, projector={config.projector}, dtype={dtype}, {len(source)} tensors')
  shapes = layout.leaf_shapes(abstract_params(config))
  entries = (layout.vision_entries(config.vision, shapes) + layout.projector_entries(config, shapes, fold) +
             layout.text_entries(config.text, shapes))
  return Llava(config), _fill(source, entries, shapes, dtype, log, path)


def added_token_id(path: str, token: str) -> Optional[int]:
  """Id of an added token in the tokenizer files of `path` (added_tokens.json, tokenizer.json or
  tokenizer_config.json), read as JSON without building the tokenizer; None when no file names it."""
  import json
  for name, find in (('added_tokens.json', lambda d: d.get(token)),
                     ('tokenizer.json', lambda d: next((t['id'] for t in d.get('added_tokens', [])
                                                        if t.get('content') == token), None)),
                     ('tokenizer_config.json', lambda d: next((int(i) for i, t in d.get('added_tokens_decoder',
                                                                                       {}).items()
                                                               if t.get('content') == token), None))):
    file = os.path.join(path, name)
    if os.path.isfile(file):
      with open(file) as f:
        found = find(json.load(f))
      if found is not None:
        return int(found)
  return None


def load_original_llava(path: str, *, vision_tower: Optional[str] = None, mm_projector: Optional[str] = None,
                        dtype: Optional[str] = None, image_token_id: Optional[int] = None,
                        pad_vocab_multiple: int = 64, log: Log = None) -> tuple[Llava, dict]:
  """Original-release LLaVA (haotian-liu/LLaVA): LLaMA weights with `model.mm_projector.*` (or a separate
  `mm_projector.bin`) plus the CLIP checkpoint the config names (`mm_vision_tower`) or `vision_tower`.

  The release splices one -200 id at run time; we need an in-vocab image token, so unless `image_token_id` is an
  existing id the vocab grows by one row (id = old vocab size, like llava-hf's `<image>` = 32000), padded to a
  multiple of `pad_vocab_multiple`; new rows take the mean of the old ones. An `mm_use_im_patch_token` model
  already has `<im_patch>` in its vocab: that is the image token (its id read from the tokenizer files in `path`).
  `mm_use_im_start_end` / `mm_use_im_patch_token` go into the config (tokenize.ImageTokens lays out the prompt).
  """
  import transformers
  raw = read_json(path)
  llm_json = {k: v for k, v in raw.items() if not k.startswith('mm_') and k != 'model_type'}
  family = TEXT_MODEL_TYPES.get(raw.get('model_type', 'llama'), 'llama')  # llava_mistral -> mistral, ...
  text_hc = transformers.AutoConfig.for_model(family, **llm_json)
  text = text_from_hf(text_hc, path)

  vision_dir = vision_tower or raw.get('mm_vision_tower')
  llm_source, ignored = _rename(open_checkpoint(path), layout.canonical_llama, path)
  has_inner_tower = any(k.startswith(layout.VISION) for k in llm_source)
  if not has_inner_tower and not (vision_dir and os.path.isdir(vision_dir)):
    raise FileNotFoundError(f'{path}: the original-release LLaVA needs its CLIP checkpoint: pass vision_tower=DIR '
                            f'(config.json names {raw.get("mm_vision_tower")!r}, not a local directory)')
  vision_hc = transformers.CLIPVisionConfig.from_pretrained(vision_dir)
  parts = [llm_source]
  if not has_inner_tower:
    parts.append(clip_source(vision_dir, log))
  if mm_projector:
    proj, more = _rename(open_checkpoint(mm_projector), layout.canonical_original_extra, mm_projector)
    parts.append(proj)
    ignored += more
  source = _merge(*parts)
  if text.tie_word_embeddings and layout.LM_HEAD in source:
    ignored.append(source.pop(layout.LM_HEAD).name)
  _log_ignored(log, ignored, 'buffers / tied lm_head')

  projector = original_projector(raw)
  if projector is None:  # plain LLaMA config + mm_projector.bin: the keys say which projector it is
    projector = 'mlp2x_gelu' if layout.PROJ + 'linear_2.weight' in source else 'linear'
  vision = vision_from_hf(vision_hc, vision_dir, raw.get('mm_vision_select_layer', -2),
                          raw.get('mm_vision_select_feature', 'patch'))
  if raw.get('mm_hidden_size', vision.hidden_size) != vision.hidden_size:
    raise ValueError(f'{path}: mm_hidden_size={raw["mm_hidden_size"]} but {vision_dir} has hidden_size '
                     f'{vision.hidden_size}')
  hf_vocab = text.vocab_size
  image_layout = image_layout_of(raw)
  if image_token_id is None and image_layout['mm_use_im_patch_token']:
    image_token_id = added_token_id(path, IM_PATCH)
    if image_token_id is None:
      raise ValueError(f'{path}: config.json key mm_use_im_patch_token=true, but no tokenizer file there names '
                       f'{IM_PATCH}; pass its id as image_token_id (--image-token-id)')
  if image_token_id is None:
    image_token_id = hf_vocab
  vocab = hf_vocab if image_token_id < hf_vocab else -(-(image_token_id + 1) // pad_vocab_multiple) * pad_vocab_multiple
  if vocab != hf_vocab and log:
    log(f'  vocab {hf_vocab} -> {vocab}: image token id {image_token_id} appended (rows = mean embedding)')
  dtype = _pick_dtype(dtype, source, layout.TEXT + 'embed_tokens.weight', path)
  config = LlavaConfig(vision=vision, text=dataclasses.replace(text, vocab_size=vocab), projector=projector,
                       image_token_id=image_token_id, param_dtype=dtype, **image_layout)
  shapes = layout.leaf_shapes(abstract_params(config))
  text_entries = [dataclasses.replace(e, hf_shape=(hf_vocab,) + e.hf_shape[1:])
                  if e.path[-1] == 'embedding' or e.path[-2:] == ('lm_head', 'kernel') else e
                  for e in layout.text_entries(config.text, shapes)]
  entries = layout.vision_entries(vision, shapes) + layout.projector_entries(config, shapes) + text_entries
  if log:
    log(f'{path}: original-release LLaVA, projector={projector}, vision tower {vision_dir}, dtype={dtype}')
  return Llava(config), _fill(source, entries, shapes, dtype, log, path)
