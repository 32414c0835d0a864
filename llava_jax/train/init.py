"""Initial params of a stage: random init, then modules overwritten from checkpoints (`config.init`).

Order: `model_from` (all modules), then `vision_from` (vision_tower), `llm_from` (language_model) and
`projector_from` (projector, e.g. the stage-1 export). Each source is an exported model directory
or a HF directory, read by `llava_jax.model_dir.read_params`. Shapes must match the configured model, except
the vocabulary: a checkpoint with fewer rows (e.g. Vicuna's 32000 vs LLaVA's 32064 with the image token) fills
the first rows and the new rows keep their random init, as HF's resize_token_embeddings does.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax import model_dir
from llava_jax.models.config import LlavaConfig
from llava_jax.models.llava import init_params
from llava_jax.train import partition

SOURCES = (('model_from', model_dir.MODULES), ('vision_from', ('vision_tower',)), ('llm_from', ('language_model',)),
           ('projector_from', ('projector',)))
VOCAB_LEAVES = ('language_model/embed_tokens/embedding', 'language_model/lm_head/kernel')


def random_split(model_config: LlavaConfig, mask, abstract_trainable, abstract_frozen, seed: int):
  """(trainable fp32, frozen in compute dtype) random params, created directly in their shardings."""
  shardings = jax.tree.map(lambda a: a.sharding, (abstract_trainable, abstract_frozen))

  def make(key):
    trainable, frozen = partition.split(init_params(model_config, key), mask)
    cast = lambda tree, ab: jax.tree.map(lambda x, a: x.astype(a.dtype), tree, ab)
    return cast(trainable, abstract_trainable), cast(frozen, abstract_frozen)

  return jax.jit(make, out_shardings=shardings)(jax.random.key(seed))


def _place(value, target, path: str, source: str):
  """One loaded leaf -> the dtype and sharding of `target` (vocab rows may be fewer: see module doc)."""
  value = np.asarray(jax.device_get(value)) if not isinstance(value, np.ndarray) else value
  if value.shape != target.shape:
    vocab_axis = 0 if path.endswith('embedding') else value.ndim - 1
    grows_vocab = (path in VOCAB_LEAVES and value.ndim == target.ndim and
                   all(v == t for i, (v, t) in enumerate(zip(value.shape, target.shape)) if i != vocab_axis) and
                   value.shape[vocab_axis] < target.shape[vocab_axis])
    if not grows_vocab:
      raise ValueError(f'{source}: param {path} has shape {value.shape}, the configured model needs '
                       f'{target.shape}; the checkpoint and the config.model section disagree')
    rows = value.shape[vocab_axis]
    index = (slice(0, rows),) if vocab_axis == 0 else (Ellipsis, slice(0, rows))
    merged = target.at[index].set(jnp.asarray(value, target.dtype))
    return jax.device_put(merged, target.sharding)
  return jax.device_put(value.astype(target.dtype), target.sharding)


def initial_params(init, model_config: LlavaConfig, mask, abstract_trainable, abstract_frozen, seed: int,
                   log: Callable[[str], None] = print):
  """`init`: the config's `init` section. Returns (trainable, frozen) placed on the mesh."""
  trainable, frozen = random_split(model_config, mask, abstract_trainable, abstract_frozen, seed)
  flat_t, flat_f = partition.flatten(trainable), partition.flatten(frozen)
  loaded = set()
  for key, modules in SOURCES:
    path = init[key]
    if path is None:
      continue
    parts = model_dir.read_params(path, modules)
    for module, tree in parts.items():
      got = set()
      for leaf_path, value in partition.flatten(tree).items():
        full = f'{module}/{leaf_path}'
        flat = flat_t if full in flat_t else flat_f if full in flat_f else None
        if flat is None:
          raise ValueError(f'init.{key}={path}: param {full} does not exist in the configured model')
        flat[full] = _place(value, flat[full], full, f'init.{key}={path}')
        got.add(full)
      missing = sorted(k for k in (*flat_t, *flat_f) if k.startswith(module + '/') and k not in got)
      if missing:
        raise ValueError(f'init.{key}={path} lacks {len(missing)} {module} params the model needs, e.g. '
                         f'{missing[:3]}')
      loaded.add(module)
      log(f'init: {module} <- {path} (init.{key})')
  for module in model_dir.MODULES:
    if module not in loaded:
      log(f'init: {module} random (seed {seed})')
  return partition.unflatten(flat_t), partition.unflatten(flat_f)
