"""HF `config.json` <-> our model configs.

Reading goes through transformers' config classes so that fields a checkpoint omits take HF's own defaults
(llava-hf's config.json lists only the fields that differ). Anything our port does not implement (another
activation, rope scaling other than llama3, biases in LLaMA, several feature layers) is an error, never silently
dropped.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from llava_jax.models.config import LlamaConfig, LlavaConfig, VisionConfig

SELECT_FROM_HF = {'default': 'patch', 'full': 'cls_patch'}
SELECT_TO_HF = {v: k for k, v in SELECT_FROM_HF.items()}
PROJECTOR_FROM_HF_ACT = {'gelu': 'mlp2x_gelu', 'linear': 'linear'}  # 'linear': two Dense layers, folded into one


def read_json(path: str) -> dict:
  cfg = os.path.join(path, 'config.json') if os.path.isdir(path) else path
  if not os.path.isfile(cfg):
    raise FileNotFoundError(f'{path}: no config.json')
  with open(cfg) as f:
    return json.load(f)


def _need(cond: bool, where: str, msg: str):
  if not cond:
    raise ValueError(f'{where}: {msg}')


def vision_from_hf(hc, where: str, feature_layer: int = -2, feature_select: str = 'patch') -> VisionConfig:
  """transformers CLIPVisionConfig -> VisionConfig."""
  _need(hc.hidden_act == 'quick_gelu', where, f'vision hidden_act={hc.hidden_act!r}; only quick_gelu (CLIP) is ported')
  _need(hc.num_channels == 3, where, f'vision num_channels={hc.num_channels}; only RGB (3) is supported')
  _need(isinstance(feature_layer, int), where,
        f'vision_feature_layer={feature_layer!r}; only a single layer (an int) is supported')
  return VisionConfig(hidden_size=hc.hidden_size, intermediate_size=hc.intermediate_size,
                      num_layers=hc.num_hidden_layers, num_heads=hc.num_attention_heads, patch_size=hc.patch_size,
                      image_size=hc.image_size, layer_norm_eps=hc.layer_norm_eps, feature_layer=feature_layer,
                      feature_select=feature_select)


# HF model_type of a decoder -> ours; original-release model_types name the family after `llava_`.
TEXT_MODEL_TYPES = {'llama': 'llama', 'mistral': 'mistral', 'qwen2': 'qwen2', 'llava_llama': 'llama',
                    'llava_mistral': 'mistral', 'llava_qwen': 'qwen2', 'llava_qwen2': 'qwen2', 'llava': 'llama'}
LLAMA3_ROPE_KEYS = ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')


def rope_of(hc, where: str) -> dict:
  """RoPE fields of LlamaConfig from HF `rope_parameters` (5.x) / `rope_scaling` (4.x): plain or llama3."""
  rp = getattr(hc, 'rope_parameters', None) or {}
  kind = rp.get('rope_type', rp.get('type', 'default'))
  _need(kind in ('default', 'llama3'), where, f'config.json key rope_scaling: rope_type {kind!r} is not supported; '
        "supported: 'default' (no scaling) and 'llama3' (Llama-3.1)")
  out = dict(rope_theta=float(rp.get('rope_theta', getattr(hc, 'rope_theta', 10000.0))), rope_type=kind)
  if kind == 'llama3':
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in rp]
    _need(not missing, where, f'config.json key rope_scaling (llama3) lacks {missing}')
    out.update(rope_factor=float(rp['factor']), rope_low_freq_factor=float(rp['low_freq_factor']),
               rope_high_freq_factor=float(rp['high_freq_factor']),
               rope_original_max_position_embeddings=int(rp['original_max_position_embeddings']))
  return out


def rope_to_hf(t: LlamaConfig) -> dict:
  """`rope_parameters` (5.x); 4.x reads `rope_theta` and, for scaled RoPE, the same dict as `rope_scaling`."""
  rp = {'rope_type': t.rope_type, 'rope_theta': t.rope_theta}
  if t.rope_type == 'llama3':
    rp.update(factor=t.rope_factor, low_freq_factor=t.rope_low_freq_factor, high_freq_factor=t.rope_high_freq_factor,
              original_max_position_embeddings=t.rope_original_max_position_embeddings)
  out = {'rope_theta': t.rope_theta, 'rope_parameters': rp}
  if t.rope_type != 'default':
    out['rope_scaling'] = dict(rp)
  return out


def text_from_hf(hc, where: str, tie: Optional[bool] = None) -> LlamaConfig:
  """transformers LlamaConfig / MistralConfig / Qwen2Config -> LlamaConfig."""
  family = TEXT_MODEL_TYPES.get(getattr(hc, 'model_type', 'llama'))
  _need(family is not None, where, f'config.json key model_type={hc.model_type!r}; supported decoders: '
        f'{sorted(set(TEXT_MODEL_TYPES.values()))}')
  _need(hc.hidden_act == 'silu', where, f'text hidden_act={hc.hidden_act!r}; only silu (SwiGLU) is ported')
  _need(not getattr(hc, 'attention_bias', False), where, 'text attention_bias=True is not supported (LLaMA has none)')
  _need(not getattr(hc, 'mlp_bias', False), where, 'text mlp_bias=True is not supported (LLaMA has none)')
  window = getattr(hc, 'sliding_window', None) if family == 'mistral' else None
  if family == 'qwen2':
    _need(not getattr(hc, 'use_sliding_window', False), where,
          'config.json key use_sliding_window=true is not supported for qwen2 (the public Qwen2 models have false)')
  heads = hc.num_attention_heads
  kv = hc.num_key_value_heads if getattr(hc, 'num_key_value_heads', None) else heads
  head_dim = getattr(hc, 'head_dim', None)
  return LlamaConfig(vocab_size=hc.vocab_size, hidden_size=hc.hidden_size, intermediate_size=hc.intermediate_size,
                     num_layers=hc.num_hidden_layers, num_heads=heads, num_kv_heads=kv,
                     head_dim=None if head_dim in (None, hc.hidden_size // heads) else head_dim,
                     rms_norm_eps=hc.rms_norm_eps, max_position_embeddings=hc.max_position_embeddings,
                     tie_word_embeddings=bool(hc.tie_word_embeddings if tie is None else tie),
                     model_type=family, sliding_window=window, **rope_of(hc, where))


def text_to_hf(t: LlamaConfig, torch_dtype: str) -> dict[str, Any]:
  """Our LlamaConfig -> an HF decoder config dict (LlamaConfig / MistralConfig / Qwen2Config)."""
  out = {
      'model_type': t.model_type, 'vocab_size': t.vocab_size, 'hidden_size': t.hidden_size,
      'intermediate_size': t.intermediate_size, 'num_hidden_layers': t.num_layers,
      'num_attention_heads': t.num_heads, 'num_key_value_heads': t.num_kv_heads, 'head_dim': t.dim_per_head,
      'hidden_act': 'silu', 'rms_norm_eps': t.rms_norm_eps, **rope_to_hf(t),
      'max_position_embeddings': t.max_position_embeddings, 'tie_word_embeddings': t.tie_word_embeddings,
      'torch_dtype': torch_dtype, 'dtype': torch_dtype,
  }
  if t.model_type == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  elif t.model_type == 'mistral':
    out['sliding_window'] = t.sliding_window
  else:
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def llava_from_hf(hc, where: str, param_dtype: str) -> tuple[LlavaConfig, bool]:
  """transformers LlavaConfig -> (LlavaConfig, fold): fold=True when HF's projector is two Dense layers with a
  linear activation (our `linear`)."""
  act = hc.projector_hidden_act
  _need(act in PROJECTOR_FROM_HF_ACT, where,
        f'projector_hidden_act={act!r}; supported: {sorted(PROJECTOR_FROM_HF_ACT)}')
  _need(getattr(hc, 'multimodal_projector_bias', True), where, 'multimodal_projector_bias=False is not supported')
  strategy = hc.vision_feature_select_strategy
  _need(strategy in SELECT_FROM_HF, where,
        f'vision_feature_select_strategy={strategy!r}; supported: {sorted(SELECT_FROM_HF)}')
  vc = hc.vision_config
  _need(getattr(vc, 'model_type', 'clip_vision_model') == 'clip_vision_model', where,
        f'vision tower model_type={vc.model_type!r}; only clip_vision_model is ported')
  vision = vision_from_hf(vc, where, hc.vision_feature_layer, SELECT_FROM_HF[strategy])
  tie = bool(getattr(hc, 'tie_word_embeddings', False) or hc.text_config.tie_word_embeddings)
  text = text_from_hf(hc.text_config, where, tie)
  config = LlavaConfig(vision=vision, text=text, projector=PROJECTOR_FROM_HF_ACT[act],
                       image_token_id=hc.image_token_index, param_dtype=param_dtype, **image_layout_of(hc))
  return config, act == 'linear'


IMAGE_LAYOUT_KEYS = ('mm_use_im_start_end', 'mm_use_im_patch_token')


def image_layout_of(config) -> dict:
  """The original release's image token layout keys (also written into our HF exports' config.json)."""
  get = config.get if isinstance(config, dict) else lambda k, d: getattr(config, k, d)
  return {k: bool(get(k, False)) for k in IMAGE_LAYOUT_KEYS}


def original_projector(raw: dict) -> Optional[str]:
  """Projector type of an original-release config.json (`mm_projector_type`, default linear), None if absent."""
  if not any(k.startswith('mm_') for k in raw):
    return None
  return raw.get('mm_projector_type', 'linear')


def llava_to_hf(config: LlavaConfig, torch_dtype: str, tokenizer=None) -> dict[str, Any]:
  """Our LlavaConfig -> an HF LLaVA config.json dict that transformers 4.x and 5.x both read.

  Both spellings are written where the two versions differ (`rope_theta` / `rope_parameters`,
  `torch_dtype` / `dtype`). A `linear` or `identity` projector is written as HF's two Dense layers with a linear
  activation (see flax_to_hf).
  """
  v, t = config.vision, config.text
  text = text_to_hf(t, torch_dtype)
  vision = {
      'model_type': 'clip_vision_model', 'hidden_size': v.hidden_size, 'intermediate_size': v.intermediate_size,
      'num_hidden_layers': v.num_layers, 'num_attention_heads': v.num_heads, 'patch_size': v.patch_size,
      'image_size': v.image_size, 'layer_norm_eps': v.layer_norm_eps, 'hidden_act': 'quick_gelu',
      'num_channels': 3,
  }
  out = {
      'architectures': ['LlavaForConditionalGeneration'], 'model_type': 'llava',
      'text_config': text, 'vision_config': vision, 'image_token_index': config.image_token_id,
      'image_seq_length': config.num_image_tokens,
      'projector_hidden_act': 'gelu' if config.projector == 'mlp2x_gelu' else 'linear',
      'multimodal_projector_bias': True, 'vision_feature_layer': v.feature_layer,
      'vision_feature_select_strategy': SELECT_TO_HF[v.feature_select],
      'tie_word_embeddings': t.tie_word_embeddings, 'torch_dtype': torch_dtype, 'dtype': torch_dtype,
  }
  if config.mm_use_im_start_end or config.mm_use_im_patch_token:  # transformers keeps unknown keys; we read them
    out.update({k: getattr(config, k) for k in IMAGE_LAYOUT_KEYS})
  if tokenizer is not None:
    for key in ('pad_token_id', 'bos_token_id', 'eos_token_id'):
      value = getattr(tokenizer, key, None)
      if value is not None:
        text[key] = value
        out[key] = value
  return out
