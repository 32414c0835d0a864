"""Test-wide setup: 8 virtual CPU devices (mesh tests) set before jax is imported, and tiny random HF models."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

# Tiny shapes shared by the parity tests: a 4-block CLIP (feature layer -2 -> 3 blocks run, 1 kept unused),
# 16 patches of 8x8 on a 32x32 image, and a 2-layer LLaMA with grouped-query attention (4 heads, 2 kv heads).
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
                   patch_size=8, hidden_act='quick_gelu', layer_norm_eps=1e-5, projection_dim=16)
TINY_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)
IMAGE_TOKEN = 100


def randomize_(model, seed: int):
  """Re-draw every weight at a scale where outputs depend on all of them (HF's 0.02 init gives near-uniform logits):
  matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1), biases and 1-D embeddings ~ N(0, 0.1)."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
      if p.ndim >= 2:
        p.copy_(noise / (p[0].numel() ** 0.5))
      elif 'norm' in name or 'layrnorm' in name:
        p.copy_(1 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return model.eval()


def hf_llava(projector_act='gelu', select='default', tie=False, seed=0, rope_theta=10000.0):
  """A tiny random transformers LlavaForConditionalGeneration (fp32, eval mode)."""
  import torch
  import transformers
  torch.manual_seed(seed)
  text = dict(TINY_TEXT, tie_word_embeddings=tie, rope_parameters={'rope_type': 'default', 'rope_theta': rope_theta})
  config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**TINY_VISION),
                                    text_config=transformers.LlamaConfig(**text), image_token_index=IMAGE_TOKEN,
                                    projector_hidden_act=projector_act, vision_feature_select_strategy=select,
                                    vision_feature_layer=-2, tie_word_embeddings=tie)
  return randomize_(transformers.LlavaForConditionalGeneration(config), seed)


@pytest.fixture(scope='session')
def tiny():
  """The builders above, for tests in any file."""
  import types
  return types.SimpleNamespace(vision=TINY_VISION, text=TINY_TEXT, image_token=IMAGE_TOKEN, randomize_=randomize_,
                               hf_llava=hf_llava)
