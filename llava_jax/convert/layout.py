"""The one table between HF tensor names (hub layout) and our param tree, used by import and export alike.

Canonical HF names are the transformers 4.x hub layout of `LlavaForConditionalGeneration` (llava-hf):
`vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`,
`language_model.lm_head.weight`. Every other layout we read is renamed to it first (`canonical_*`).

Tensor kinds (HF tensor <-> our array):
  copy    same shape                      flat   HF 1-D = ours flattened (per-head biases)
  conv    Conv2d (O, I, kh, kw) <-> (kh, kw, I, O)
  denseN  Linear weight (out, in) <-> kernel [*in_dims(N), *out_dims]
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import numpy as np

from llava_jax.models.config import LlamaConfig, LlavaConfig, VisionConfig

VISION = 'vision_tower.vision_model.'
TEXT = 'language_model.model.'
LM_HEAD = 'language_model.lm_head.weight'
PROJ = 'multi_modal_projector.'

# Buffers some checkpoints carry that are not weights (recomputed by every implementation).
IGNORED = (re.compile(r'(^|\.)position_ids$'), re.compile(r'rotary_emb\.inv_freq$'))


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str                # canonical HF name
  path: tuple            # our param path
  layer: Optional[int]   # index along the stacked leading dim (scanned layers), else None
  kind: str              # copy | flat | conv | dense1 | dense2
  hf_shape: tuple        # expected shape of the HF tensor


CLIP_BLOCK = (
    ('layer_norm1.weight', ('layer_norm1', 'scale'), 'copy'),
    ('layer_norm1.bias', ('layer_norm1', 'bias'), 'copy'),
    ('self_attn.q_proj.weight', ('q_proj', 'kernel'), 'dense1'),
    ('self_attn.q_proj.bias', ('q_proj', 'bias'), 'flat'),
    ('self_attn.k_proj.weight', ('k_proj', 'kernel'), 'dense1'),
    ('self_attn.k_proj.bias', ('k_proj', 'bias'), 'flat'),
    ('self_attn.v_proj.weight', ('v_proj', 'kernel'), 'dense1'),
    ('self_attn.v_proj.bias', ('v_proj', 'bias'), 'flat'),
    ('self_attn.out_proj.weight', ('out_proj', 'kernel'), 'dense2'),
    ('self_attn.out_proj.bias', ('out_proj', 'bias'), 'copy'),
    ('layer_norm2.weight', ('layer_norm2', 'scale'), 'copy'),
    ('layer_norm2.bias', ('layer_norm2', 'bias'), 'copy'),
    ('mlp.fc1.weight', ('fc1', 'kernel'), 'dense1'),
    ('mlp.fc1.bias', ('fc1', 'bias'), 'copy'),
    ('mlp.fc2.weight', ('fc2', 'kernel'), 'dense1'),
    ('mlp.fc2.bias', ('fc2', 'bias'), 'copy'),
)

LLAMA_BLOCK = (
    ('input_layernorm.weight', ('input_layernorm', 'scale'), 'copy'),
    ('self_attn.q_proj.weight', ('q_proj', 'kernel'), 'dense1'),
    ('self_attn.k_proj.weight', ('k_proj', 'kernel'), 'dense1'),
    ('self_attn.v_proj.weight', ('v_proj', 'kernel'), 'dense1'),
    ('self_attn.o_proj.weight', ('o_proj', 'kernel'), 'dense2'),
    ('post_attention_layernorm.weight', ('post_attention_layernorm', 'scale'), 'copy'),
    ('mlp.gate_proj.weight', ('gate_proj', 'kernel'), 'dense1'),
    ('mlp.up_proj.weight', ('up_proj', 'kernel'), 'dense1'),
    ('mlp.down_proj.weight', ('down_proj', 'kernel'), 'dense1'),
)
QKV_BIASES = tuple((f'self_attn.{n}_proj.bias', (f'{n}_proj', 'bias'), 'flat') for n in 'qkv')  # Qwen2


def hf_shape(kind: str, shape: tuple) -> tuple:
  """Shape of the HF tensor holding our array of `shape` (one layer)."""
  if kind == 'copy':
    return tuple(shape)
  if kind == 'flat':
    return (math.prod(shape),)
  if kind == 'conv':
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  n = int(kind[len('dense'):])
  return (math.prod(shape[n:]), math.prod(shape[:n]))


def to_flax(kind: str, src: np.ndarray, dst: np.ndarray) -> None:
  """Write HF tensor `src` into our (preallocated, contiguous) array view `dst`, casting on the fly."""
  if not dst.flags.c_contiguous:  # reshape below must be a view, or the write would land in a temporary
    raise ValueError(f'destination of kind {kind} is not contiguous')
  if kind == 'copy':
    dst[...] = src
  elif kind == 'flat':
    dst.reshape(-1)[...] = src
  elif kind == 'conv':
    dst[...] = src.transpose(2, 3, 1, 0)
  else:
    n = int(kind[len('dense'):])
    dst.reshape(math.prod(dst.shape[:n]), -1)[...] = src.T


def to_hf(kind: str, arr: np.ndarray) -> np.ndarray:
  """Our array (one layer) -> the HF tensor (a view where possible)."""
  if kind == 'copy':
    return arr
  if kind == 'flat':
    return arr.reshape(-1)
  if kind == 'conv':
    return arr.transpose(3, 2, 0, 1)
  n = int(kind[len('dense'):])
  return arr.reshape(math.prod(arr.shape[:n]), -1).T


def _entry(hf, path, layer, kind, shapes):
  shape = shapes[path]
  return Entry(hf, path, layer, kind, hf_shape(kind, shape[1:] if layer is not None else shape))


def vision_entries(config: VisionConfig, shapes: dict) -> list[Entry]:
  """Entries for `vision_tower` (all HF blocks: the ones after the feature layer go to `unused_layers`)."""
  r, p = ('vision_tower',), VISION
  out = [_entry(p + 'embeddings.patch_embedding.weight', r + ('patch_embedding', 'kernel'), None, 'conv', shapes),
         _entry(p + 'embeddings.class_embedding', r + ('class_embedding',), None, 'copy', shapes),
         _entry(p + 'embeddings.position_embedding.weight', r + ('position_embedding',), None, 'copy', shapes)]
  for name in ('pre_layrnorm', 'post_layernorm'):
    out += [_entry(f'{p}{name}.weight', r + (name, 'scale'), None, 'copy', shapes),
            _entry(f'{p}{name}.bias', r + (name, 'bias'), None, 'copy', shapes)]
  used = config.num_layers_used
  for i in range(config.num_layers):
    group, j = ('layers', i) if i < used else ('unused_layers', i - used)
    out += [_entry(f'{p}encoder.layers.{i}.{hf}', r + (group,) + sub, j, kind, shapes) for hf, sub, kind in CLIP_BLOCK]
  return out


def text_entries(config: LlamaConfig, shapes: dict) -> list[Entry]:
  r, p = ('language_model',), TEXT
  out = [_entry(p + 'embed_tokens.weight', r + ('embed_tokens', 'embedding'), None, 'copy', shapes),
         _entry(p + 'norm.weight', r + ('norm', 'scale'), None, 'copy', shapes)]
  if not config.tie_word_embeddings:
    out.append(_entry(LM_HEAD, r + ('lm_head', 'kernel'), None, 'dense1', shapes))
  for i in range(config.num_layers):
    block = LLAMA_BLOCK + (QKV_BIASES if config.qkv_bias else ())
    out += [_entry(f'{p}layers.{i}.{hf}', r + ('layers',) + sub, i, kind, shapes) for hf, sub, kind in block]
  return out


def projector_entries(config: LlavaConfig, shapes: dict, fold: bool = False) -> list[Entry]:
  """Projector entries. `fold=True`: HF's two-layer projector with a linear activation (how HF holds a `linear`
  projector) is read as kind 'fold' and folded into our single Dense (see hf_to_flax.fold_linear)."""
  r = ('projector',)
  if config.projector == 'identity':
    return []
  if fold:
    d, v = config.text.hidden_size, config.vision.hidden_size
    return [Entry(f'{PROJ}linear_1.weight', r + ('linear_1', 'kernel'), None, 'fold', (d, v)),
            Entry(f'{PROJ}linear_1.bias', r + ('linear_1', 'bias'), None, 'fold', (d,)),
            Entry(f'{PROJ}linear_2.weight', r + ('linear_1', 'kernel'), None, 'fold', (d, d)),
            Entry(f'{PROJ}linear_2.bias', r + ('linear_1', 'bias'), None, 'fold', (d,))]
  names = ('linear_1', 'linear_2') if config.projector == 'mlp2x_gelu' else ('linear_1',)
  return ([_entry(f'{PROJ}{n}.weight', r + (n, 'kernel'), None, 'dense1', shapes) for n in names] +
          [_entry(f'{PROJ}{n}.bias', r + (n, 'bias'), None, 'copy', shapes) for n in names])


def leaf_shapes(tree, prefix=()) -> dict:
  """{path: shape} of a nested dict of arrays / ShapeDtypeStructs."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(leaf_shapes(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = tuple(v.shape)
  return out


def get_path(tree, path):
  for k in path:
    tree = tree[k]
  return tree


# ----------------------------------------------------------------------------------------------------------------
# Renaming every layout we read to the canonical one. Each returns None for names it does not claim.


def canonical_llava(name: str) -> Optional[str]:
  """HF LLaVA: 4.x hub layout, 5.x `save_pretrained` (vision tower without `vision_model.`), 5.x module names."""
  for old, new in (('model.language_model.', TEXT), ('lm_head.', 'language_model.lm_head.'),
                   ('model.vision_tower.', 'vision_tower.'), ('model.multi_modal_projector.', PROJ)):
    if name.startswith(old):
      name = new + name[len(old):]
      break
  if name.startswith('vision_tower.') and not name.startswith(VISION):
    name = VISION + name[len('vision_tower.'):]
  return name


CLIP_TEXT_PARTS = ('text_model.', 'visual_projection.', 'text_projection.', 'logit_scale')


def canonical_clip(name: str) -> Optional[str]:
  """CLIPModel / CLIPVisionModel 4.x (`vision_model.*`) or CLIPVisionModel 5.x (no prefix). Text side -> None."""
  if name.startswith(CLIP_TEXT_PARTS):
    return None
  if name.startswith('vision_model.'):
    name = name[len('vision_model.'):]
  return VISION + name


def canonical_llama(name: str) -> Optional[str]:
  """LlamaForCausalLM (`model.*`, `lm_head.weight`), also the LLaMA part of an original-release LLaVA."""
  if name.startswith('model.mm_projector.') or name.startswith('model.vision_tower.'):
    return canonical_original_extra(name)
  if name.startswith('model.'):
    return TEXT + name[len('model.'):]
  if name.startswith('lm_head.'):
    return 'language_model.' + name
  return name


def canonical_original_extra(name: str) -> str:
  """Original release (haotian-liu/LLaVA): `model.mm_projector.{0,2}.*` (mlp2x_gelu) or `model.mm_projector.*`
  (linear); a vision tower saved inside the model as `model.vision_tower.vision_tower.[vision_model.]*`."""
  m = re.match(r'^model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$', name)
  if m:
    index = {None: 1, '0': 1, '2': 2}.get(m.group(1))
    return f'{PROJ}linear_{index}.{m.group(2)}' if index else name
  inner = 'model.vision_tower.vision_tower.'
  if name.startswith(inner):  # saved by transformers 4.x with `vision_model.`, by 5.x without
    rest = name[len(inner):]
    return VISION + (rest[len('vision_model.'):] if rest.startswith('vision_model.') else rest)
  return name


def is_ignored(name: str) -> bool:
  return any(p.search(name) for p in IGNORED)
