"""Training configs: load `configs/X.py[:arg]`, apply `--config.a.b=v` overrides, validate once at start-up.

Configs are `ml_collections.ConfigDict`s returned by `get_config(arg)` in a Python file (big_vision style); their
defaults live in `configs/common.py`. This module holds no defaults: only the schema (key -> type and allowed
values) that `validate` checks, so that a typo, a wrong type, a mesh that does not fit the devices, a batch that
does not split over the data axes or a missing data/checkpoint path fails in one message before anything
compiles.

Two shapes of config:
- a *stage* (stage1_pretrain.py, stage2_finetune.py, scienceqa.py): one training run;
- a *pipeline* (demo.py): `stages.<name>` stage configs run in `stage_order`, each in `<workdir>/<name>`, after an
  optional `demo` data preparation and before an optional `eval`.
String values may contain `{workdir}`, replaced by the run's (pipeline's) work directory.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

import ml_collections

from llava_jax.data.conversation import TEMPLATES
from llava_jax.data.image import ASPECTS
from llava_jax.models.config import LlavaConfig


class ConfigError(ValueError):
  """A bad config: the message names every bad key with what is allowed."""


# ------------------------------------------------------------------------------------------------ schema

class Key:
  """Schema entry: allowed python types, optional choices / check, whether None is allowed, path semantics."""

  def __init__(self, types, *, choices: Sequence = (), check: Optional[Callable[[Any], Optional[str]]] = None,
               nullable: bool = False, path: Optional[str] = None):
    self.types = types if isinstance(types, tuple) else (types,)
    self.choices, self.check, self.nullable, self.path = tuple(choices), check, nullable, path

  def errors(self, key: str, value) -> list[str]:
    if value is None:
      return [] if self.nullable else [f'{key} is not set (None); expected {self._type_names()}']
    if isinstance(value, bool) and bool not in self.types:
      return [f'{key}={value!r} has type bool; expected {self._type_names()}']
    if not isinstance(value, self.types) and not (float in self.types and isinstance(value, int)):
      return [f'{key}={value!r} has type {type(value).__name__}; expected {self._type_names()}']
    if self.choices and value not in self.choices:
      return [f'{key}={value!r}; allowed: {list(self.choices)}']
    msg = self.check(value) if self.check else None
    return [f'{key}={value!r}: {msg}'] if msg else []

  def _type_names(self) -> str:
    names = [t.__name__ for t in self.types] + (['None'] if self.nullable else [])
    return ' or '.join(names)


def _positive(v):
  return None if v > 0 else 'must be > 0'


def _non_negative(v):
  return None if v >= 0 else 'must be >= 0'


def _ratio(v):
  return None if 0 <= v < 1 else 'must be in [0, 1)'


def _mesh_shape(v):
  if len(v) != 3 or not all(isinstance(x, int) and (x > 0 or x == -1) for x in v):
    return "must be 3 ints (data, fsdp, tensor), each > 0 or one of them -1 ('the remaining devices')"
  if list(v).count(-1) > 1:
    return 'at most one entry may be -1'
  return None


def _rules(v):
  for rule in v:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            and isinstance(rule[1], bool)):
      return f'each rule must be a (regex, trainable: bool) pair; got {rule!r}'
    try:
      re.compile(rule[0])
    except re.error as e:
      return f'bad regex {rule[0]!r}: {e}'
  return None if v else 'needs at least one rule'


STAGE_SCHEMA: dict[str, Key] = {
    'seed': Key(int),
    'workdir': Key(str, nullable=True),
    'mesh.shape': Key((tuple, list), check=_mesh_shape),
    'data.train_dir': Key(str, path='dir'),
    'data.split': Key(str),
    'data.tokenizer': Key(str, path='any'),
    'data.template': Key(str, choices=tuple(TEMPLATES)),
    'data.max_length': Key(int, check=_positive),
    'data.image_aspect': Key(str, choices=ASPECTS),
    'data.global_batch_size': Key(int, check=_positive),
    'data.num_epochs': Key(int, check=_positive),
    'data.shuffle': Key(bool),
    'data.group_by_length': Key(bool),
    'data.worker_count': Key(int, check=_non_negative),
    'train.steps': Key(int, check=lambda v: None if v > 0 or v == -1 else 'must be > 0, or -1 (= num_epochs)'),
    'train.trainable': Key((tuple, list), check=_rules),
    'train.grad_accum_steps': Key(int, check=_positive),
    'train.nan_policy': Key(str, choices=('stop', 'skip')),
    'train.max_skipped_steps': Key(int, check=_non_negative),
    'optim.lr': Key(float, check=_positive),
    'optim.projector_lr': Key(float, nullable=True, check=_positive),
    'optim.weight_decay': Key(float, check=_non_negative),
    'optim.b1': Key(float, check=_ratio),
    'optim.b2': Key(float, check=_ratio),
    'optim.eps': Key(float, check=_positive),
    'optim.warmup_ratio': Key(float, check=_ratio),
    'optim.schedule': Key(str, choices=('cosine', 'constant')),
    'optim.clip_norm': Key(float, check=_non_negative),
    'init.model_from': Key(str, nullable=True, path='any'),
    'init.projector_from': Key(str, nullable=True, path='any'),
    'init.vision_from': Key(str, nullable=True, path='any'),
    'init.llm_from': Key(str, nullable=True, path='any'),
    'init.allow_random_frozen': Key(bool),
    'checkpoint.every_steps': Key(int, check=_positive),
    'checkpoint.keep': Key(int, check=_positive),
    'checkpoint.async_save': Key(bool),
    'export.model': Key(bool),
    'export.hf_dir': Key(str, nullable=True),
    'log.every_steps': Key(int, check=_positive),
    'log.peak_tflops': Key(float, nullable=True, check=_positive),
    'log.tensorboard': Key(bool),
    # Optional section (configs/scale.py): the hardware a job is sized for; read by --dry_run only.
    'hardware.name': Key(str),
    'hardware.devices': Key(int, check=_positive),
    'hardware.hbm_gib': Key(float, check=_positive),
}

PIPELINE_SCHEMA: dict[str, Key] = {
    'workdir': Key(str),
    'stage_order': Key((tuple, list), check=lambda v: None if v and all(isinstance(s, str) for s in v)
                       else 'must be a non-empty list of stage names'),
    'demo.num_train_images': Key(int, check=_positive),
    'demo.num_qa': Key(int, check=_positive),
    'demo.image_size': Key(int, check=_positive),
    'demo.max_objects': Key(int, check=lambda v: None if 1 <= v <= 9 else 'must be in 1..9'),
    'demo.seed': Key(int),
    'demo.vocab_size': Key(int, check=_positive),
    'demo.conversations_per_image': Key(int, check=_non_negative),
    'demo.num_vqa_train': Key(int, check=_non_negative),
    'demo.stage2_kinds': Key((tuple, list), check=lambda v: None if v and set(v) <= {'conversation', 'detail',
                             'reasoning'} else "must be a non-empty subset of ('conversation', 'detail', 'reasoning')"),
    'vision_warmup.steps': Key(int, check=_positive),
    'vision_warmup.lr': Key(float, check=_positive),
    'vision_warmup.batch_size': Key(int, check=_positive),
    'vision_warmup.seed': Key(int),
    'eval.stage': Key(str),
    'eval.qa_file': Key(str, path='any'),
    'eval.image_dir': Key(str, path='dir'),
    'eval.batch_size': Key(int, check=_positive),
    'eval.max_new_tokens': Key(int, check=_positive),
}
# Optional pipeline sections: present or absent as a whole.
OPTIONAL_SECTIONS = ('demo', 'vision_warmup', 'eval')


def is_pipeline(config) -> bool:
  return 'stages' in config


# ------------------------------------------------------------------------------------------------ loading

def parse_config_spec(spec: str) -> tuple[str, Optional[str]]:
  """'configs/x.py:arg' -> ('configs/x.py', 'arg'); the arg is optional."""
  path, _, arg = spec.partition(':')
  return path, (arg or None)


def load_file(spec: str):
  """Import the config file and call its `get_config(arg)`."""
  path, arg = parse_config_spec(spec)
  if not os.path.isfile(path):
    raise ConfigError(f'--config: no such config file {path!r}')
  path = os.path.abspath(path)
  # `from configs import common` inside config files: make the folder above configs/ importable.
  root = os.path.dirname(os.path.dirname(path))
  added = root not in sys.path
  if added:
    sys.path.insert(0, root)
  try:
    mod_spec = importlib.util.spec_from_file_location(f'_llava_config_{abs(hash(path))}', path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
  finally:
    if added:
      sys.path.remove(root)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config(arg)')
  try:
    config = module.get_config(arg) if arg is not None else module.get_config()
  except (AttributeError, TypeError, KeyError, ValueError) as e:
    raise ConfigError(f'{spec}: get_config({arg!r}) failed: {e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'{path}: get_config must return an ml_collections.ConfigDict, got {type(config).__name__}')
  return config


def _parse_value(key: str, text: str, current):
  """Parse an override string against the type of the value it replaces."""
  if isinstance(current, bool):
    low = text.lower()
    if low not in ('true', 'false', '1', '0'):
      raise ConfigError(f'--config.{key}={text!r}: expected a bool (true/false)')
    return low in ('true', '1')
  if isinstance(current, str) or (current is None and not _looks_literal(text)):
    return None if text == 'None' else text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f'--config.{key}={text!r}: cannot parse as {type(current).__name__}') from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if current is not None and value is not None and not isinstance(value, type(current)):
    if not (isinstance(current, (tuple, list)) and isinstance(value, (tuple, list))):
      raise ConfigError(f'--config.{key}={text!r}: expected {type(current).__name__}, got {type(value).__name__}')
  return value


def _looks_literal(text: str) -> bool:
  try:
    ast.literal_eval(text)
    return True
  except (ValueError, SyntaxError):
    return False


def apply_overrides(config, overrides: Sequence[str]):
  """Apply `a.b=v` overrides (the `--config.` prefix already removed). Unknown keys fail naming the allowed ones."""
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep:
      raise ConfigError(f'override {item!r} must look like --config.{item}=VALUE')
    node, parts = config, key.split('.')
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = '.'.join(parts[:i]) or '<top level>'
        allowed = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f'--config.{key}: unknown key {part!r} under {where}; allowed: {allowed}')
      if i < len(parts) - 1:
        node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f'--config.{key} is a section; set one of its keys: {sorted(current.keys())}')
    value = _parse_value(key, text, current)
    with node.unlocked(), node.ignore_type():
      node[parts[-1]] = value
  return config


def load(spec: str, overrides: Sequence[str] = (), workdir: Optional[str] = None):
  """File + overrides + `--workdir`, with `{workdir}` placeholders resolved. Not yet validated."""
  config = load_file(spec)
  apply_overrides(config, overrides)
  with config.unlocked():
    if workdir is not None:
      config.workdir = workdir
    elif config.get('workdir') is None:
      config.workdir = os.path.join('workdir', os.path.splitext(os.path.basename(parse_config_spec(spec)[0]))[0])
  resolve_workdir(config, config.workdir)
  return config


def resolve_workdir(config, workdir: str):
  """Replace `{workdir}` in every string value (stage configs of a pipeline included)."""
  for key, value in list(config.items()):
    if isinstance(value, ml_collections.ConfigDict):
      resolve_workdir(value, workdir)
    elif isinstance(value, str) and '{workdir}' in value:
      with config.unlocked(), config.ignore_type():
        config[key] = value.replace('{workdir}', workdir)


# ------------------------------------------------------------------------------------------------ validation

def _flat(config, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, name + '.'))
    else:
      out[name] = value
  return out


def _check_schema(config, schema: dict[str, Key], prefix: str, skip_sections=()) -> list[str]:
  flat = {k: v for k, v in _flat(config).items() if k.split('.')[0] not in skip_sections}
  errors = []
  for key in sorted(set(flat) - set(schema)):
    section = key.rsplit('.', 1)[0] if '.' in key else ''
    allowed = sorted(k.rsplit('.', 1)[-1] for k in schema if (k.rsplit('.', 1)[0] if '.' in k else '') == section)
    errors.append(f'{prefix}{key}: unknown key; allowed here: {allowed}')
  for key, spec in schema.items():
    if key.split('.')[0] in skip_sections:
      continue
    if key not in flat:
      errors.append(f'{prefix}{key}: missing')
    else:
      errors.extend(prefix + e for e in spec.errors(key, flat[key]))
  return errors


def model_config(config) -> LlavaConfig:
  """The config's `model` section as the models' dataclass."""
  return LlavaConfig.from_dict(config.model.to_dict())


def _resolved_mesh(shape, num_devices: int) -> Optional[tuple[int, ...]]:
  shape = list(shape)
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if num_devices % rest:
      return None
    shape[shape.index(-1)] = num_devices // rest
  return tuple(shape) if math.prod(shape) == num_devices else None


def _path_errors(config, schema, prefix, produced_under: Optional[str], bad=()) -> list[str]:
  errors = []
  for key, spec in schema.items():
    if spec.path is None or key in bad:
      continue
    section, _, name = key.partition('.')
    value = config[section][name] if name else config[section]
    if value is None:
      continue
    if produced_under and os.path.abspath(value).startswith(os.path.abspath(produced_under) + os.sep):
      continue  # written by an earlier step of this pipeline; checked again when its stage starts
    if not os.path.exists(value):
      errors.append(f'{prefix}{key}={value!r}: no such {"directory" if spec.path == "dir" else "file or directory"}')
  return errors


def validate_stage(config, *, num_devices: int, process_count: int = 1, prefix: str = '',
                   check_paths: bool = True, produced_under: Optional[str] = None) -> list[str]:
  """All problems of one stage config as messages naming their keys (empty list = valid)."""
  errors = _check_schema(config, STAGE_SCHEMA, prefix,
                         skip_sections=('model',) + (() if 'hardware' in config else ('hardware',)))
  bad = {e[len(prefix):].split('=')[0].split(':')[0].split(' ')[0] for e in errors}
  ok = lambda *keys: not any(k in bad for k in keys)
  if 'model' not in config or not isinstance(config.model, ml_collections.ConfigDict):
    return errors + [f'{prefix}model: missing section']
  try:
    mc = model_config(config)
  except (ValueError, TypeError) as e:
    return errors + [f'{prefix}model: {e}']
  if ok('mesh.shape', 'data.global_batch_size', 'train.grad_accum_steps'):
    mesh = _resolved_mesh(config.mesh.shape, num_devices)
    if mesh is None:
      errors.append(f'{prefix}mesh.shape={tuple(config.mesh.shape)} does not fit the {num_devices} available '
                    'devices (the product must equal the device count; one entry may be -1)')
    else:
      shards = mesh[0] * mesh[1]
      gb, accum = config.data.global_batch_size, config.train.grad_accum_steps
      if gb % (shards * accum):
        errors.append(f'{prefix}data.global_batch_size={gb} is not divisible by the data axes (data x fsdp = '
                      f'{shards}) times train.grad_accum_steps={accum}')
      if gb % process_count:
        errors.append(f'{prefix}data.global_batch_size={gb} is not divisible by the {process_count} processes')
  if ok('data.max_length') and config.data.max_length <= mc.num_image_tokens:
    errors.append(f'{prefix}data.max_length={config.data.max_length} leaves no room next to the '
                  f'{mc.num_image_tokens} image tokens')
  if ok('train.trainable', 'optim.projector_lr'):
    if config.optim.projector_lr is not None and not any(
        re.fullmatch(r, 'projector/linear_1/kernel') and t for r, t in config.train.trainable):
      errors.append(f'{prefix}optim.projector_lr is set but train.trainable freezes the projector')
    if ok('init.allow_random_frozen', 'init.model_from', 'init.vision_from', 'init.llm_from',
          'init.projector_from'):
      errors.extend(_random_frozen_errors(config, mc, prefix))
  if check_paths:
    errors.extend(_path_errors(config, STAGE_SCHEMA, prefix, produced_under, bad))
  return errors


def _random_frozen_errors(config, mc: LlavaConfig, prefix: str) -> list[str]:
  """A frozen module that no checkpoint initialises would stay random forever: almost surely a missing path."""
  if config.init.allow_random_frozen or config.init.model_from:
    return []
  from llava_jax.models.llava import abstract_params
  from llava_jax.train import partition
  try:
    mask = partition.trainable_paths(abstract_params(mc), config.train.trainable)
  except ValueError as e:
    return [f'{prefix}train.trainable: {e}']
  sources = {'vision_tower': 'init.vision_from', 'projector': 'init.projector_from',
             'language_model': 'init.llm_from'}
  errors = []
  for module, key in sources.items():
    frozen = [p for p, t in mask.items() if p.startswith(module + '/') and not t]
    section, name = key.split('.')
    if frozen and config[section][name] is None:
      errors.append(f'{prefix}{key} is not set but {module} is frozen ({len(frozen)} tensors would stay random); '
                    'set it (or init.model_from), or init.allow_random_frozen=True for tests')
  return errors


def validate(config, *, num_devices: int, process_count: int = 1, check_paths: bool = True) -> None:
  """Raise one ConfigError listing every problem of a stage or pipeline config."""
  if is_pipeline(config):
    skip = tuple(s for s in OPTIONAL_SECTIONS if s not in config)
    flat_top = ml_collections.ConfigDict({k: v for k, v in config.items() if k != 'stages'})
    errors = _check_schema(flat_top, PIPELINE_SCHEMA, '', skip_sections=skip)
    if check_paths and not errors:
      present = {k: v for k, v in PIPELINE_SCHEMA.items() if k.split('.')[0] not in skip}
      errors.extend(_path_errors(flat_top, present, '', produced_under=config.workdir))
    names = list(config.get('stage_order') or ())
    for name in names:
      if name not in config.stages:
        errors.append(f'stage_order: unknown stage {name!r}; defined: {sorted(config.stages.keys())}')
    if 'vision_warmup' in config and 'demo' not in config:
      errors.append('vision_warmup: needs the demo section (it trains on the demo dataset\'s boxes)')
    if 'eval' in config and config.eval.get('stage') not in names:
      errors.append(f'eval.stage={config.eval.get("stage")!r}; allowed: {names}')
    for name in names:
      if name in config.stages:
        errors.extend(validate_stage(config.stages[name], num_devices=num_devices, process_count=process_count,
                                     prefix=f'stages.{name}.', check_paths=check_paths,
                                     produced_under=config.workdir))
  else:
    errors = validate_stage(config, num_devices=num_devices, process_count=process_count, check_paths=check_paths)
  if errors:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(errors))
