"""Named model sizes. Configs in configs/ pick one by name and may override fields."""
from __future__ import annotations

import dataclasses

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
    # Mistral-7B v0.1 (4096-token sliding window); v0.2 (Instruct, LLaVA-1.6's base) drops the window.
    'mistral_7b_v0_1': LlamaConfig(model_type='mistral', intermediate_size=14336, num_kv_heads=8,
                                   max_position_embeddings=32768, sliding_window=4096),
    'mistral_7b_v0_2': LlamaConfig(model_type='mistral', intermediate_size=14336, num_kv_heads=8,
                                   max_position_embeddings=32768, rope_theta=1e6),
    # Llama-3 / 3.1 8B: 128K vocab, rope theta 5e5; 3.1 stretches RoPE to 128K positions (llama3 scaling).
    'llama3_8b': LlamaConfig(vocab_size=128256, intermediate_size=14336, num_kv_heads=8, rope_theta=500000.0,
                             max_position_embeddings=8192),
    'llama31_8b': LlamaConfig(vocab_size=128256, intermediate_size=14336, num_kv_heads=8, rope_theta=500000.0,
                              max_position_embeddings=131072, rope_type='llama3', rope_factor=8.0,
                              rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                              rope_original_max_position_embeddings=8192),
    # Qwen2 (and Qwen2.5, same shapes): q/k/v biases; 0.5B and 1.5B tie the embeddings.
    'qwen2_0_5b': LlamaConfig(model_type='qwen2', vocab_size=151936, hidden_size=896, intermediate_size=4864,
                              num_layers=24, num_heads=14, num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                              max_position_embeddings=32768, tie_word_embeddings=True),
    'qwen2_1_5b': LlamaConfig(model_type='qwen2', vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                              num_layers=28, num_heads=12, num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                              max_position_embeddings=32768, tie_word_embeddings=True),
    'qwen2_7b': LlamaConfig(model_type='qwen2', vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                            num_layers=28, num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6,
                            max_position_embeddings=32768),
    'tiny': LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=512),
}

# image_token_id follows llava-hf: the first id after the tokenizer's vocab (LLaMA: 32000, vocab padded to 32064;
# Llama-3: 128256 -> 128320). Qwen2's embedding already has spare rows past its 151646 tokens (vocab_size None:
# the decoder's own).
MODELS = {
    'llava_7b': dict(vision='clip_vit_l14', text='vicuna_7b_v1_1', projector='linear', image_token_id=32000,
                     vocab_size=32064),
    'llava_13b': dict(vision='clip_vit_l14', text='vicuna_13b_v1_1', projector='linear', image_token_id=32000,
                      vocab_size=32064),
    'llava15_7b': dict(vision='clip_vit_l14_336', text='vicuna_7b_v1_5', projector='mlp2x_gelu',
                       image_token_id=32000, vocab_size=32064),
    'llava15_13b': dict(vision='clip_vit_l14_336', text='vicuna_13b_v1_5', projector='mlp2x_gelu',
                        image_token_id=32000, vocab_size=32064),
    'llava_mistral_7b': dict(vision='clip_vit_l14_336', text='mistral_7b_v0_1', projector='mlp2x_gelu',
                             image_token_id=32000, vocab_size=32064),
    'llava16_mistral_7b': dict(vision='clip_vit_l14_336', text='mistral_7b_v0_2', projector='mlp2x_gelu',
                               image_token_id=32000, vocab_size=32064),
    'llava_llama3_8b': dict(vision='clip_vit_l14_336', text='llama3_8b', projector='mlp2x_gelu',
                            image_token_id=128256, vocab_size=128320),
    'llava_llama31_8b': dict(vision='clip_vit_l14_336', text='llama31_8b', projector='mlp2x_gelu',
                             image_token_id=128256, vocab_size=128320),
    **{f'llava_qwen2_{size}': dict(vision='clip_vit_l14_336', text=f'qwen2_{size}', projector='mlp2x_gelu',
                                   image_token_id=151646, vocab_size=None) for size in ('0_5b', '1_5b', '7b')},
    'tiny': dict(vision='tiny', text='tiny', projector='mlp2x_gelu', image_token_id=3, vocab_size=512),
}


def get_model_config(name: str, **overrides) -> LlavaConfig:
  if name not in MODELS:
    raise ValueError(f'unknown model preset {name!r}; allowed: {sorted(MODELS)}')
  m = MODELS[name]
  text = TEXT[m['text']]
  if m['vocab_size'] is not None:
    text = dataclasses.replace(text, vocab_size=m['vocab_size'])
  cfg = LlavaConfig(vision=VISION[m['vision']], text=text, projector=m['projector'],
                    image_token_id=m['image_token_id'])
  return cfg.replace(**overrides) if overrides else cfg
