"""Initial params of a stage: random init, then modules overwritten from checkpoints (`config.init`).

Order: `model_from` (all modules), then `vision_from` (vision_tower), `llm_from` (language_model) and
`projector_from` (projector, e.g. the stage-1 export). Each source is an exported model directory
or a HF directory, read by `llava_jax.model_dir.read_params`. Shapes must match the configured model, except
the vocabulary: a checkpoint with fewer rows (e.g. Vicuna's 32000 vs LLaVA's 32064 with the image token) fills
the first rows and the new rows keep their random init, as HF's resize_token_embeddings does; with
<im_start>/<im_end> (model.mm_use_im_start_end) they take the mean of the loaded rows, as the original's
initialize_vision_tokenizer sets them.
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


def _place(value, target, path: str, source: str, mean_rows: bool = False):
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
    merged = target
    if mean_rows:
      merged = jnp.broadcast_to(value.astype(np.float32).mean(vocab_axis, keepdims=True), target.shape)
    merged = merged.astype(target.dtype).at[index].set(jnp.asarray(value, target.dtype))
    return jax.device_put(merged, target.sharding)
  return jax.device_put(value.astype(target.dtype), target.sharding)


def initial_params(init, model_config: LlavaConfig, mask, abstract_trainable, abstract_frozen, seed: int,
                   log: Callable[[str], None] = print):
  """`init`: the config's `init` section. Returns (trainable, frozen) placed on the mesh."""
  trainable, frozen = random_split(model_config, mask, abstract_trainable, abstract_frozen, seed)
  flat_t, flat_f = partition.flatten(trainable), partition.flatten(frozen)
  loaded, vocab_rows = set(), {}
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
        flat[full] = _place(value, flat[full], full, f'init.{key}={path}', model_config.mm_use_im_start_end)
        if full in VOCAB_LEAVES:
          vocab_rows[full] = value.shape[0]
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
  if model_config.mm_use_im_start_end and init['projector_from'] is not None and init['llm_from'] is not None:
    _stage1_token_rows(init, flat_t, flat_f, vocab_rows[VOCAB_LEAVES[0]], log)
  return partition.unflatten(flat_t), partition.unflatten(flat_f)


def _stage1_token_rows(init, flat_t, flat_f, rows: int, log) -> None:
  """The input embeddings of the tokens added after the LLM's vocab (<im_start>, <im_end>) as stage 1 trained
  them: the original's stage 2 takes them from the stage-1 file with the projector (pretrain_mm_mlp_adapter)."""
  path, leaf = init['projector_from'], VOCAB_LEAVES[0]
  stage1 = model_dir.read_params(path, ('language_model',))['language_model']['embed_tokens']['embedding']
  stage1 = np.asarray(jax.device_get(stage1))
  flat = flat_t if leaf in flat_t else flat_f
  target = flat[leaf]
  if stage1.shape != target.shape:
    raise ValueError(f'init.projector_from={path}: {leaf} has shape {stage1.shape}, the model needs {target.shape}')
  merged = target.at[rows:].set(jnp.asarray(stage1[rows:], target.dtype))
  flat[leaf] = jax.device_put(merged, target.sharding)
  log(f'init: {leaf}[{rows}:] (tokens added to the LLM, trained in stage 1) <- {path} (init.projector_from)')
