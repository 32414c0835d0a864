"""Model FLOPs of a train step, counting only what is actually computed for the gradient, and the device peak.

Per module with N matmul weights (embedding lookups excluded) applied to T tokens:
  forward                           2 N T                  (always)
  backward to its inputs            2 N T   if a gradient flows through it: it or a module before it trains
  backward to its weights           2 N_t T  for its N_t trainable weights
So a trained LLM costs 6N per token, a frozen one that the projector's gradient passes through 4N (stage 1), and
a frozen vision tower that nothing before it trains 2N (forward only). Attention adds, per token and layer,
4 d T_ctx forward (QK^T and AV over the full, non-causal context, as PaLM/MaxText count it) and twice that again
when a gradient flows through it; the context of a token is its own sample (its segment in a packed row).
Tokens: the LLM on the tokens of the samples, the vision tower on patches (+ CLS) of every image, the projector on
the selected image features. `step_flops` counts every position of fixed-shape rows (the compute the hardware
does); MFU counts only the work of real tokens and images (`work_flops` of `train.step.batch_work`).
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.models.config import LlavaConfig
from llava_jax.train import partition

ORDER = ('vision_tower', 'projector', 'language_model')
# Leaves that are not matmul weights: lookups and additive embeddings, norms, biases.
_NOT_MATMUL = ('embed_tokens', 'position_embedding', 'class_embedding', 'norm', 'layer_norm', 'layrnorm', 'bias')


def _is_matmul(path: str) -> bool:
  return not any(part in path for part in _NOT_MATMUL)


def unit_flops(config: LlavaConfig, mask: dict[str, bool], shapes) -> dict[str, float]:
  """FLOPs of one optimizer step per unit of work: 'token' (an LLM token), 'attention_pair' (a (query, key)
  pair of one LLM sample: a sample of L tokens has L^2) and 'image' (the vision tower and projector on one image)."""
  v = config.vision
  weights = {m: [0.0, 0.0] for m in ORDER}   # [all matmul weights, trainable ones]
  for path, leaf in partition.flatten(shapes).items():
    module = path.split('/')[0]
    if not _is_matmul(path) or 'unused_layers' in path:  # blocks after the feature layer never run
      continue
    n = float(np.prod(leaf.shape))
    weights[module][0] += n
    weights[module][1] += n if mask[path] else 0.0
  # Tokens per unit, and attention FLOPs per token of a module (the vision tower's context is its own image).
  tokens = {'vision_tower': v.num_patches + 1, 'projector': config.num_image_tokens, 'language_model': 1}
  attn = {'vision_tower': 4.0 * v.num_layers_used * v.hidden_size * (v.num_patches + 1), 'projector': 0.0,
          'language_model': 0.0}
  units, flowing = {'image': 0.0}, False
  for m in ORDER:
    n_all, n_trained = weights[m]
    flowing = flowing or n_trained > 0
    per_token = 2 * n_all + (2 * n_all if flowing else 0) + 2 * n_trained + attn[m] * (3 if flowing else 1)
    if m == 'language_model':
      t = config.text
      units['token'] = per_token
      units['attention_pair'] = 4.0 * t.num_layers * t.num_heads * t.dim_per_head * (3 if flowing else 1)
    else:
      units['image'] += per_token * tokens[m]
  return units


def work_flops(units: dict[str, float], tokens: float, attention_pairs: float, images: float) -> float:
  """FLOPs of a step that did this work (see unit_flops; counts from train.step.batch_work)."""
  return units['token'] * tokens + units['attention_pair'] * attention_pairs + units['image'] * images


def step_flops(config: LlavaConfig, mask: dict[str, bool], shapes, batch: int, seq_len: int,
               images: int) -> float:
  """FLOPs of one optimizer step over `batch` sequences of `seq_len` tokens holding `images` images, every
  position counted (what fixed-shape rows compute, padding included)."""
  return work_flops(unit_flops(config, mask, shapes), batch * seq_len, batch * seq_len ** 2, images)


# Dense bf16 peak per chip (vendor figures); other devices are measured.
_PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'V100': 125.0, 'L4': 121.0, 'A10G': 125.0,
                'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5p': 459.0, 'TPU v6': 918.0}


def peak_flops_per_device(dtype: str = 'float32') -> tuple[float, str]:
  """(FLOP/s, where the figure comes from) for one local device."""
  kind = jax.devices()[0].device_kind
  for name, tflops in _PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops * 1e12, f'{kind} spec sheet'
  return measure_matmul_peak(dtype), f'{kind}: measured {dtype} matmul'


def measure_matmul_peak(dtype: str = 'float32', n: int = 1024, reps: int = 5) -> float:
  """Best FLOP/s of an n x n matmul on the first device (a few hundred ms on a CPU)."""
  x = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(x, x).block_until_ready()
  best = math.inf
  for _ in range(reps):
    t = time.perf_counter()
    f(x, x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best
