"""What ml_collections does not check in a stage config, each problem named by its key, before anything compiles.

The config system itself is the library's (`llava_jax/train/cli.py`): `configs/X.py:arg` with `get_config(arg)`,
typed `--config.a.b=v` overrides, a locked ConfigDict (an unknown key fails where it is set), typed placeholders
for optional values; the defaults are in `configs/common.py`. Left to check here: value ranges and choices, values
a stage cannot run without, the structure of tuple values (mesh shape, stage rules), cross-field rules (mesh vs
device count, batch divisibility, sequence length vs image tokens, projector lr vs mask, frozen modules that no
checkpoint initialises) and paths.

    validate(config, num_devices=jax.device_count())       # raises one ConfigError listing every problem
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Optional

from llava_jax import sharding
from llava_jax.data.conversation import TEMPLATES
from llava_jax.data.image import ASPECTS
from llava_jax.models import lora as lora_lib
from llava_jax.models.config import LlavaConfig
from llava_jax.models.llava import abstract_params
from llava_jax.train import partition

Check = Callable[[Any], Optional[str]]  # value -> None (fine) or what is wrong with it


class ConfigError(ValueError):
  """A bad config: the message names every bad key with what is allowed."""


def positive(v) -> Optional[str]:
  return None if v > 0 else 'must be > 0'


def non_negative(v) -> Optional[str]:
  return None if v >= 0 else 'must be >= 0'


def ratio(v) -> Optional[str]:
  return None if 0 <= v < 1 else 'must be in [0, 1)'


def choice(allowed) -> Check:
  allowed = list(allowed)
  return lambda v: None if v in allowed else f'allowed: {allowed}'


def _mesh_shape(v) -> Optional[str]:
  if len(v) != 3 or not all(isinstance(x, int) and (x > 0 or x == -1) for x in v):
    return "must be 3 ints (data, fsdp, tensor), each > 0 or one of them -1 ('the remaining devices')"
  return 'at most one entry may be -1' if list(v).count(-1) > 1 else None


def _regex_error(v) -> Optional[str]:
  try:
    re.compile(v)
  except re.error as e:
    return f'bad regex: {e}'
  return None


def _rules(v) -> Optional[str]:
  for rule in v:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            and isinstance(rule[1], bool)):
      return f'each rule must be a (regex, trainable: bool) pair; got {rule!r}'
    try:
      re.compile(rule[0])
    except re.error as e:
      return f'bad regex {rule[0]!r}: {e}'
  return None if v else 'needs at least one rule'


# key -> check of its value (types are the library's: every key has the type of its default).
STAGE_CHECKS: dict[str, Check] = {
    'mesh.shape': _mesh_shape,
    'data.template': choice(TEMPLATES),
    'data.max_length': positive,
    'data.image_aspect': choice(ASPECTS),
    'data.global_batch_size': positive,
    'data.num_epochs': positive,
    'data.max_images_per_row': positive,
    'data.row_length': positive,
    'data.worker_count': non_negative,
    'train.steps': lambda v: None if v > 0 or v == -1 else 'must be > 0, or -1 (= num_epochs)',
    'train.trainable': _rules,
    'train.grad_accum_steps': positive,
    'train.nan_policy': choice(('stop', 'skip')),
    'train.max_skipped_steps': non_negative,
    'train.lora.r': non_negative,
    'train.lora.alpha': positive,
    'train.lora.dropout': ratio,
    'train.lora.targets': lambda v: _regex_error(v),
    'train.lora.base_bits': choice((0, 8, 4)),
    'optim.lr': positive,
    'optim.projector_lr': positive,
    'optim.weight_decay': non_negative,
    'optim.b1': ratio,
    'optim.b2': ratio,
    'optim.eps': positive,
    'optim.warmup_ratio': ratio,
    'optim.schedule': choice(('cosine', 'constant')),
    'optim.clip_norm': non_negative,
    'checkpoint.every_steps': positive,
    'checkpoint.keep': positive,
    'log.every_steps': positive,
    'log.peak_tflops': positive,
    # Optional section (configs/scale.py): the hardware a job is sized for; read by --dry_run only.
    'hardware.devices': positive,
    'hardware.hbm_gib': positive,
}
REQUIRED = ('data.train_dir', 'data.tokenizer')  # placeholders a stage cannot run without
# Paths that must exist: 'dir' or 'any' (file or directory).
STAGE_PATHS = {'data.train_dir': 'dir', 'data.tokenizer': 'any', 'init.model_from': 'any',
               'init.projector_from': 'any', 'init.vision_from': 'any', 'init.llm_from': 'any',
               'init.adapter_dir': 'dir'}


def lookup(config, key: str, default=None):
  """config['a']['b'] for 'a.b'; `default` when a section or key is absent."""
  node = config
  for part in key.split('.'):
    if part not in node:
      return default
    node = node[part]
  return node


def value_errors(config, checks: dict[str, Check], prefix: str = '') -> list[str]:
  """`{prefix}{key}={value!r}: what is wrong` for every set value that fails its check (None = not set)."""
  errors = []
  for key, check in checks.items():
    value = lookup(config, key)
    msg = check(value) if value is not None else None
    if msg:
      sep = '; ' if msg.startswith('allowed') else ': '
      errors.append(f'{prefix}{key}={value!r}{sep}{msg}')
  return errors


def path_errors(config, paths: dict[str, str], prefix: str = '', produced_under: Optional[str] = None,
                skip=()) -> list[str]:
  """Paths that do not exist. Those under `produced_under` are written by an earlier step of a pipeline."""
  errors = []
  for key, kind in paths.items():
    value = lookup(config, key)
    if value is None or key in skip:
      continue
    if produced_under and os.path.abspath(value).startswith(os.path.abspath(produced_under) + os.sep):
      continue  # checked again when the step that reads it starts
    if not os.path.exists(value):
      errors.append(f'{prefix}{key}={value!r}: no such {"directory" if kind == "dir" else "file or directory"}')
  return errors


def seq_len(config) -> int:
  """Tokens per training row: data.row_length when packing (default data.max_length), else data.max_length."""
  d = config.data
  return d.row_length if d.packing and d.row_length is not None else d.max_length


def model_config(config) -> LlavaConfig:
  """The config's `model` section as the models' dataclass."""
  return LlavaConfig.from_dict(config.model.to_dict())


def lora_spec(config) -> Optional[lora_lib.LoraSpec]:
  """The config's `train.lora` as the models' LoraSpec; None when r = 0 (or the section is absent)."""
  lo = lookup(config, 'train.lora')
  if lo is None or not lo.r:
    return None
  return lora_lib.LoraSpec(rank=int(lo.r), alpha=float(lo.alpha), dropout=float(lo.dropout), targets=lo.targets)


def lora_errors(mc: LlavaConfig, spec: lora_lib.LoraSpec, rules, prefix: str = '') -> list[str]:
  """What keeps `spec` from training on the model: targets matching nothing or outside the LLM, a rank above a
  layer's width, stage rules that would train a LoRA'd base kernel or leave a factor frozen."""
  shapes = partition.flatten(abstract_params(mc, spec))
  factors = lora_lib.factor_paths(partition.unflatten(shapes))
  key = f'{prefix}train.lora.targets={spec.targets!r}'
  if not factors:
    return [f'{key} matches no Dense kernel of the model (kernel paths look like '
            'language_model/layers/q_proj/kernel; lm_head is language_model/lm_head/kernel)']
  outside = [k for k in shapes if k.endswith('/kernel') and k not in factors and re.fullmatch(spec.targets, k)]
  errors = [f'{key} matches {outside[0]}: LoRA applies to the LLM (language_model/...) only'] if outside else []
  for kernel, fp in factors.items():
    a, b = shapes[fp + '/a'], shapes[fp + '/b']
    lead, n_in, _ = lora_lib.kernel_dims(shapes[kernel].shape, a.shape, b.shape)
    fan_in, fan_out = math.prod(a.shape[lead:-1]), math.prod(b.shape[lead + 1:])
    if spec.rank > min(fan_in, fan_out):
      errors.append(f'{prefix}train.lora.r={spec.rank} exceeds the dimensions of {kernel} (in {fan_in}, out '
                    f'{fan_out}); use r <= {min(fan_in, fan_out)} or leave that layer out of train.lora.targets')
      break
  try:
    mask = partition.trainable_paths(partition.unflatten(shapes), rules)
  except ValueError as e:
    return errors + [f'{prefix}train.trainable: {e}']
  trained = [k for k in factors if mask[k]]
  if trained:
    errors.append(f'{prefix}train.trainable trains {trained[0]} (and {len(trained) - 1} more), which '
                  'train.lora targets: with LoRA the base stays frozen; use configs/common.LORA_TRAINABLE')
  frozen = [k for k, t in mask.items() if k.startswith(lora_lib.COLLECTION + '/') and not t]
  if frozen:
    errors.append(f'{prefix}train.trainable freezes the LoRA factor {frozen[0]}; start the rules with '
                  "('lora/.*', True)")
  return errors


def _lora_config_errors(config, mc: LlavaConfig, prefix: str) -> list[str]:
  spec = lora_spec(config)
  if spec is None:
    unused = [k for k in ('train.lora.base_bits', 'init.adapter_dir', 'export.peft_dir') if lookup(config, k)]
    return [f'{prefix}{k}={lookup(config, k)!r} needs LoRA: set train.lora.r > 0' for k in unused]
  return lora_errors(mc, spec, config.train.trainable, prefix)


def stage_errors(config, *, num_devices: int, process_count: int = 1, prefix: str = '', check_paths: bool = True,
                 produced_under: Optional[str] = None) -> list[str]:
  """All problems of one stage config as messages naming their keys (empty list = valid)."""
  errors = value_errors(config, STAGE_CHECKS, prefix)
  errors += [f'{prefix}{key} is not set' for key in REQUIRED if lookup(config, key) is None]
  bad = {e[len(prefix):].split('=')[0].split(' ')[0] for e in errors}
  ok = lambda *keys: not any(k in bad for k in keys)
  try:
    mc = model_config(config)
  except (ValueError, TypeError) as e:
    return errors + [f'{prefix}model: {e}']
  if ok('mesh.shape', 'data.global_batch_size', 'train.grad_accum_steps'):
    errors += _batch_errors(config, num_devices, process_count, prefix)
  if ok('data.max_length') and config.data.max_length <= mc.num_image_tokens:
    errors.append(f'{prefix}data.max_length={config.data.max_length} leaves no room next to the '
                  f'{mc.num_image_tokens} image tokens')
  row = seq_len(config)
  if config.data.packing and ok('data.max_length', 'data.row_length') and row < config.data.max_length:
    errors.append(f'{prefix}data.row_length={row} is shorter than data.max_length={config.data.max_length}: '
                  'a sample of max_length tokens would not fit a row')
  elif config.data.packing and ok('data.max_length', 'data.max_images_per_row', 'data.row_length') and (
      config.data.max_images_per_row * mc.num_image_tokens > row):
    errors.append(f'{prefix}data.max_images_per_row={config.data.max_images_per_row}: that many images of '
                  f'{mc.num_image_tokens} tokens do not fit a row of {row} tokens (slots that are never filled '
                  'still cost vision-tower compute)')
  if ok('train.trainable', 'optim.projector_lr'):
    if config.optim.projector_lr is not None and not any(
        re.fullmatch(r, 'projector/linear_1/kernel') and t for r, t in config.train.trainable):
      errors.append(f'{prefix}optim.projector_lr is set but train.trainable freezes the projector')
    if ok('train.lora.r', 'train.lora.targets', 'train.lora.base_bits'):
      errors += _lora_config_errors(config, mc, prefix)
    errors += _random_frozen_errors(config, mc, prefix)
    errors += _start_end_errors(config, mc, prefix)
  if check_paths:
    errors += path_errors(config, STAGE_PATHS, prefix, produced_under, skip=bad)
  return errors


def _start_end_errors(config, mc, prefix: str) -> list[str]:
  """With <im_start>/<im_end> (model.mm_use_im_start_end) the original trains the input embeddings in stage 1
  (initialize_vision_tokenizer): their new rows must learn. A mask that trains the projector but not the decoder
  must then train language_model/embed_tokens."""
  rules = config.train.trainable
  trains = lambda path: bool(partition.is_trainable(path, rules))
  stage1 = trains('projector/linear_1/kernel') and not trains('language_model/layers/q_proj/kernel')
  if mc.mm_use_im_start_end and stage1 and not trains('language_model/embed_tokens/embedding'):
    return [f'{prefix}train.trainable freezes language_model/embed_tokens, but model.mm_use_im_start_end=True: '
            'stage 1 must train the input embeddings, as the original does (configs/common.py '
            'STAGE1_IM_START_END_TRAINABLE)']
  return []


def _batch_errors(config, num_devices: int, process_count: int, prefix: str) -> list[str]:
  try:
    mesh = sharding.mesh_shape(config.mesh.shape, num_devices)
  except ValueError:
    return [f'{prefix}mesh.shape={tuple(config.mesh.shape)} does not fit the {num_devices} available devices '
            '(the product must equal the device count; one entry may be -1)']
  errors = []
  shards, gb, accum = mesh[0] * mesh[1], config.data.global_batch_size, config.train.grad_accum_steps
  if gb % (shards * accum):
    errors.append(f'{prefix}data.global_batch_size={gb} is not divisible by the data axes (data x fsdp = '
                  f'{shards}) times train.grad_accum_steps={accum}')
  if gb % process_count:
    errors.append(f'{prefix}data.global_batch_size={gb} is not divisible by the {process_count} processes')
  return errors


def _random_frozen_errors(config, mc: LlavaConfig, prefix: str) -> list[str]:
  """A frozen module that no checkpoint initialises would stay random forever: almost surely a missing path."""
  if config.init.allow_random_frozen or config.init.model_from:
    return []
  try:
    mask = partition.trainable_paths(abstract_params(mc), config.train.trainable)
  except ValueError as e:
    return [f'{prefix}train.trainable: {e}']
  sources = {'vision_tower': 'init.vision_from', 'projector': 'init.projector_from',
             'language_model': 'init.llm_from'}
  errors = []
  for module, key in sources.items():
    frozen = [p for p, t in mask.items() if p.startswith(module + '/') and not t]
    if frozen and lookup(config, key) is None:
      errors.append(f'{prefix}{key} is not set but {module} is frozen ({len(frozen)} tensors would stay random); '
                    'set it (or init.model_from), or init.allow_random_frozen=True for tests')
  return errors


def raise_if(errors: list[str]) -> None:
  if errors:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(errors))


def validate(config, *, num_devices: int, process_count: int = 1, check_paths: bool = True) -> None:
  """Raise one ConfigError listing every problem of a stage config."""
  raise_if(stage_errors(config, num_devices=num_devices, process_count=process_count, check_paths=check_paths))
