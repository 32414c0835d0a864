"""The command line shared by training and the demo, on absl flags and `ml_collections.config_flags`.

  --config FILE.py[:ARG]   a config file whose get_config(ARG) returns a ConfigDict (locked by the library)
  --config.KEY=VALUE       typed override of any key (`--config.KEY VALUE` works too)
  --workdir DIR            default: the config's `workdir`, else workdir/<config file name>
  --validate-only          check the config and exit
  --coordinator, --num_processes, --process_id, --local_device_ids   multi-process start-up (distributed.py)

    config = load('configs/stage2_finetune.py:tiny', ['optim.lr=1e-4'], workdir='runs/x')   # as the CLI would

The library parses; what is written here is the error message when it refuses: the key, and what it takes.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, Optional, Sequence, Union

from absl import flags
from ml_collections import config_dict, config_flags

from llava_jax import distributed
from llava_jax.train.config_checks import ConfigError


def define_flags(fv: flags.FlagValues, argv: Sequence[str]) -> flags.FlagHolder:
  """Defines the flags above on `fv` (a fresh FlagValues per parse); returns the --config holder."""
  holder = config_flags.DEFINE_config_file(
      'config', None, 'FILE.py[:ARG]: a config file with get_config(arg); override keys with --config.KEY=VALUE',
      flag_values=fv, sys_argv=list(argv))
  flags.mark_flag_as_required('config', flag_values=fv)
  flags.DEFINE_string('workdir', None, 'checkpoints, metrics and the exported model go here (default: the '
                      "config's workdir, else workdir/<config name>)", flag_values=fv)
  flags.DEFINE_boolean('validate-only', False, 'check the config and exit', flag_values=fv)
  distributed.define_flags(fv)
  return holder


def parse(fv: flags.FlagValues, argv: Sequence[str], holder: flags.FlagHolder):
  """Parse `argv` (argv[0] = program) and return the config, `--workdir` applied. Raises ConfigError."""
  spec = _config_spec(argv)
  if spec is not None and not os.path.isfile(spec.split(':', 1)[0]):
    raise ConfigError(f'--config {spec}: no such config file')
  try:
    rest = fv(list(argv))
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(_explain(e, spec, argv)) from None
  if len(rest) > 1:
    raise ConfigError(f'unexpected arguments {rest[1:]} (overrides look like --config.optim.lr=1e-3)')
  config = holder.value
  workdir = fv['workdir'].value
  if workdir is not None:
    config.workdir = workdir
  elif config.get('workdir') is None:
    config.workdir = os.path.join('workdir', os.path.splitext(os.path.basename(spec.split(':', 1)[0]))[0])
  return config


def load(spec: str, overrides: Sequence[str] = (), workdir: Optional[str] = None):
  """`--config spec --config.<override> ... [--workdir]` parsed as the command line would; not validated."""
  argv = ['llava_jax', '--config', spec] + [f'--config.{o}' for o in overrides]
  argv += ['--workdir', workdir] if workdir is not None else []
  fv = flags.FlagValues()
  return parse(fv, argv, define_flags(fv, argv))


def command_line(prog: str, doc: str, argv=None, define: Optional[Callable[[flags.FlagValues], None]] = None
                 ) -> Union[int, tuple[flags.FlagValues, object]]:
  """`argv` (default sys.argv[1:]) -> (flags, config), or the exit status when it printed help or an error.
  `define` adds a command's own flags."""
  argv = [prog, *(sys.argv[1:] if argv is None else argv)]
  fv = flags.FlagValues()
  holder = define_flags(fv, argv)
  if define is not None:
    define(fv)
  if any(a in ('-h', '--help', '--helpfull') for a in argv[1:]):
    print(f'{doc.strip()}\n\nflags:\n{fv.get_help(include_special_flags=False)}')
    return 0
  try:
    return fv, parse(fv, argv, holder)
  except ConfigError as e:
    return fail(e)


def fail(error) -> int:
  print(f'error: {error}', file=sys.stderr)
  return 1


def start_and_run(fv: flags.FlagValues, config, validate: Callable, run: Callable[[object], dict]) -> int:
  """Multi-process start-up (before anything touches devices), validation, `--validate-only`, then `run(config)`.
  Exit status 0 done, 1 bad config, 143 stopped by SIGTERM after saving a checkpoint."""
  distributed.initialize(distributed.from_flags(fv))  # a no-op for one process
  import jax
  try:
    validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    if fv['validate-only'].value:
      print('config OK')
      return 0
    result = run(config)
  except ConfigError as e:
    return fail(e)
  return 143 if result.get('status') == 'preempted' else 0


# ------------------------------------------------------------------------------------------------ messages

def _config_spec(argv) -> Optional[str]:
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a[len('--config='):]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _bare(spec: str):
  """The config file's own config, without overrides (to name what a refused override could have been)."""
  argv = ['llava_jax', '--config', spec]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', flag_values=fv, sys_argv=argv)
  fv(argv)
  return holder.value


def _explain(error: Exception, spec: Optional[str], argv) -> str:
  """The library's refusal as one message naming the key (or the config file) and what is allowed."""
  if spec is None:
    return f'{error}'
  try:
    config = _bare(spec)
  except Exception as e:  # the file itself: its get_config failed
    arg = spec.split(':', 1)[1] if ':' in spec else None
    return f'--config {spec}: get_config({arg!r}) failed: {_reason(e)}'
  m = re.match(r'flag --config\.(\S+?)=(.*?): (.*)', str(error), re.S)
  if m:  # a value the key's parser refused
    key, text, reason = m.groups()
    parent, _, name = key.rpartition('.')
    holder = _node(config, parent)
    if isinstance(holder[name], config_dict.ConfigDict):
      return f'--config.{key} is a section; set one of its keys: {sorted(holder[name].keys())}'
    kind = holder.get_type(name).__name__
    return f'--config.{key}={text!r}: expected {kind} ({"true or false" if kind == "bool" else reason.strip()})'
  for key in _override_keys(argv):
    msg = _unknown_key(config, key)
    if msg:
      return msg
  return f'{type(error).__name__}: {error}'


def _reason(e: Exception) -> str:
  """An exception raised in get_config as one readable line (the library wraps some in a traceback)."""
  while e.args and isinstance(e.args[0], BaseException):  # ConfigDict raises AttributeError(KeyError(...))
    e = e.args[0]
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  lines = text.strip().splitlines() or [type(e).__name__]
  text = lines[-1] if 'Error whilst parsing config file' in lines[0] else ' '.join(lines)
  text = re.sub(r'<ml_collections\.[\w.]*FieldReference object at 0x[0-9a-f]+>', '<placeholder>', text)
  return re.sub(r'^[A-Za-z]*(Error|Exception): ', '', text)


def _override_keys(argv) -> list[str]:
  return [a.split('=', 1)[0][len('--config.'):] for a in argv if a.startswith('--config.')]


def _node(config, key: str):
  for part in filter(None, key.split('.')):
    config = config[part]
  return config


def _unknown_key(config, key: str) -> Optional[str]:
  node, parts = config, key.split('.')
  for i, part in enumerate(parts):
    if not isinstance(node, config_dict.ConfigDict) or part not in node:
      where = '.'.join(parts[:i]) or '<top level>'
      allowed = sorted(node.keys()) if isinstance(node, config_dict.ConfigDict) else []
      return f'--config.{key}: unknown key {part!r} under {where}; allowed: {allowed}'
    node = node[part]
  return None
