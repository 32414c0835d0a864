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

from typing import Callable, Optional

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


def random_split(model_config: LlavaConfig, mask, abstract_trainable, abstract_frozen, seed: int, lora=None,
                 skip=()):
  """(trainable fp32, frozen in compute dtype) random params, created directly in their shardings. Leaves of the
  modules in `skip` (to be loaded from checkpoints) are left out, except the vocabulary rows a checkpoint may not
  fill (VOCAB_LEAVES): XLA then never computes them, so a big frozen base is never held twice."""
  keep = lambda path: not path.startswith(tuple(m + '/' for m in skip)) or path in VOCAB_LEAVES
  sub = lambda tree: partition.unflatten({k: v for k, v in partition.flatten(tree).items() if keep(k)})
  abstract_trainable, abstract_frozen = sub(abstract_trainable), sub(abstract_frozen)
  shardings = jax.tree.map(lambda a: a.sharding, (abstract_trainable, abstract_frozen))

  def make(key):
    trainable, frozen = partition.split(init_params(model_config, key, lora=lora), mask)
    cast = lambda tree, ab: jax.tree.map(lambda x, a: x.astype(a.dtype), sub(tree), ab)
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


def _load_adapter(path: str, model_config: LlavaConfig, lora, flat_t: dict, targets: dict) -> None:
  """A PEFT adapter's factors (and projector, when it has one) into the trainable leaves."""
  from llava_jax.convert import peft as peft_io
  adapter = peft_io.read_adapter(path, model_config)
  lora_shapes = partition.unflatten({k[len('lora/'):]: v for k, v in targets.items() if k.startswith('lora/')})
  peft_io.check_matches(adapter, lora, lora_shapes, f'init.adapter_dir={path}')
  loaded = {f'lora/{k}': v for k, v in partition.flatten(adapter.lora).items()}
  if adapter.projector is not None:
    loaded.update({f'projector/{k}': v for k, v in partition.flatten(adapter.projector).items()})
  for k, v in loaded.items():
    if k not in flat_t:
      raise ValueError(f'init.adapter_dir={path}: {k} is frozen by train.trainable; the adapter trains it')
    flat_t[k] = _place(v, flat_t[k], k, f'init.adapter_dir={path}')


def initial_params(init, model_config: LlavaConfig, mask, abstract_trainable, abstract_frozen, seed: int,
                   log: Callable[[str], None] = print, lora=None, quantize: Optional[Callable] = None):
  """`init`: the config's `init` section. Returns (trainable, frozen) placed on the mesh.

  `lora`: the LoraSpec whose factors start random (A) and zero (B) unless `init.adapter_dir` gives them;
  `quantize(path, kernel)`: a frozen kernel -> its stored form (QLoRA), applied as each one is loaded.
  """
  sources = [(key, modules) for key, modules in SOURCES if init[key] is not None]
  covered = {m for _, modules in sources for m in modules}
  trainable, frozen = random_split(model_config, mask, abstract_trainable, abstract_frozen, seed, lora, covered)
  flat_t, flat_f = partition.flatten(trainable), partition.flatten(frozen)
  targets = {**partition.flatten(abstract_frozen), **partition.flatten(abstract_trainable)}
  finish = quantize or (lambda path, x: x)
  vocab_rows = {}
  for key, modules in sources:
    path = init[key]
    parts = model_dir.read_params(path, modules)
    for module, tree in parts.items():
      got = set()
      for leaf_path, value in partition.flatten(tree).items():
        full = f'{module}/{leaf_path}'
        if full not in targets:
          raise ValueError(f'init.{key}={path}: param {full} does not exist in the configured model')
        im = model_config.mm_use_im_start_end
        if mask[full]:
          flat_t[full] = _place(value, flat_t.get(full, targets[full]), full, f'init.{key}={path}', im)
        else:
          flat_f[full] = finish(full, _place(value, flat_f.get(full, targets[full]), full, f'init.{key}={path}',
                                             im))
        if full in VOCAB_LEAVES:
          vocab_rows[full] = value.shape[0]
        got.add(full)
      missing = sorted(k for k in targets if k.startswith(module + '/') and k not in got)
      if missing:
        raise ValueError(f'init.{key}={path} lacks {len(missing)} {module} params the model needs, e.g. '
                         f'{missing[:3]}')
      log(f'init: {module} <- {path} (init.{key})')
  for module in model_dir.MODULES:
    if module not in covered:
      log(f'init: {module} random (seed {seed})')
  if model_config.mm_use_im_start_end and init['projector_from'] is not None and init['llm_from'] is not None:
    _stage1_token_rows(init, flat_t, flat_f, vocab_rows[VOCAB_LEAVES[0]], log)
  adapter_dir = init.get('adapter_dir')
  if adapter_dir:
    _load_adapter(adapter_dir, model_config, lora, flat_t, targets)
    log(f'init: LoRA factors and projector <- {adapter_dir} (init.adapter_dir)')
  flat_f = {k: finish(k, v) for k, v in flat_f.items()}
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
