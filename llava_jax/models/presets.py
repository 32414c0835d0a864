"""Named model sizes. Configs in configs/ pick one by name and may override fields."""
from __future__ import annotations

from llava_jax.models.config import LlamaConfig, LlavaConfig, VisionConfig

VISION = {
    'clip_vit_l14': VisionConfig(),                 # openai/clip-vit-large-patch14 (LLaVA)
    'clip_vit_l14_336': VisionConfig(image_size=336),  # openai/clip-vit-large-patch14-336 (LLaVA-1.5)
    'tiny': VisionConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, patch_size=8,
                         image_size=32),
}

TEXT = {
    # LLaMA-1 based Vicuna v1.1 / LLaVA (rms eps 1e-6) and LLaMA-2 based Vicuna v1.5 / LLaVA-1.5 (eps 1e-5).
    'vicuna_7b_v1_1': LlamaConfig(rms_norm_eps=1e-6, max_position_embeddings=2048),
    'vicuna_13b_v1_1': LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                                   num_kv_heads=40, rms_norm_eps=1e-6, max_position_embeddings=2048),
    'vicuna_7b_v1_5': LlamaConfig(),
    'vicuna_13b_v1_5': LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                                   num_kv_heads=40),
    'tiny': LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=512),
}

# image_token_id follows llava-hf (32000 = first id after the LLaMA vocab; vocab padded to 32064).
MODELS = {
    'llava_7b': dict(vision='clip_vit_l14', text='vicuna_7b_v1_1', projector='linear', image_token_id=32000,
                     vocab_size=32064),
    'llava_13b': dict(vision='clip_vit_l14', text='vicuna_13b_v1_1', projector='linear', image_token_id=32000,
                      vocab_size=32064),
    'llava15_7b': dict(vision='clip_vit_l14_336', text='vicuna_7b_v1_5', projector='mlp2x_gelu',
                       image_token_id=32000, vocab_size=32064),
    'llava15_13b': dict(vision='clip_vit_l14_336', text='vicuna_13b_v1_5', projector='mlp2x_gelu',
                        image_token_id=32000, vocab_size=32064),
    'tiny': dict(vision='tiny', text='tiny', projector='mlp2x_gelu', image_token_id=3, vocab_size=512),
}


def get_model_config(name: str, **overrides) -> LlavaConfig:
  if name not in MODELS:
    raise ValueError(f'unknown model preset {name!r}; allowed: {sorted(MODELS)}')
  m = MODELS[name]
  text = TEXT[m['text']]
  import dataclasses
  text = dataclasses.replace(text, vocab_size=m['vocab_size'])
  cfg = LlavaConfig(vision=VISION[m['vision']], text=text, projector=m['projector'],
                    image_token_id=m['image_token_id'])
  return cfg.replace(**overrides) if overrides else cfg
