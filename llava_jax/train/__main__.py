"""python -m llava_jax.train --config configs/X.py[:arg] [--config.a.b=VALUE ...] [--workdir DIR]

Examples:
  python -m llava_jax.train --config configs/demo.py
  python -m llava_jax.train --config configs/stage1_pretrain.py:llava15_7b --workdir runs/s1 \\
      --config.data.train_dir=data/lcs558k --config.data.tokenizer=hf/vicuna-7b-v1.5 \\
      --config.init.vision_from=hf/clip-vit-large-patch14-336 --config.init.llm_from=hf/vicuna-7b-v1.5
  python -m llava_jax.train --config configs/stage2_finetune.py:llava15_7b --workdir runs/s2 \\
      --config.init.projector_from=runs/s1/model ...
  python -m llava_jax.train --config configs/scale.py:7b_stage2_8xh100 --dry_run   # memory per device, fits?

The config is validated once, before anything compiles; rerunning with the same --workdir resumes.
Several processes (one per host or GPU): see launch/ and llava_jax/distributed.py; on SLURM, Open MPI and TPU
pods nothing needs setting, elsewhere --coordinator/--num_processes/--process_id (or LLAVA_* env).
Exit status: 0 done, 1 bad config / error, 143 stopped by SIGTERM after saving a checkpoint, 2 dry run: does not
fit; a peer process that died makes the others abort (134) within the heartbeat timeout.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m llava_jax.train', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', required=True, metavar='FILE.py[:ARG]',
                 help='config file with get_config(arg); override keys with --config.KEY=VALUE')
  p.add_argument('--workdir', default=None,
                 help='checkpoints, metrics and the exported model go here (default: the config\'s workdir, '
                      'else workdir/<config name>)')
  p.add_argument('--validate-only', action='store_true', help='check the config and exit')
  p.add_argument('--dry_run', '--dry-run', action='store_true',
                 help='compile the train step for the configured mesh on simulated CPU devices, print memory per '
                      'device and whether it fits hardware.hbm_gib; allocates no weights (llava_jax/train/dry_run.py)')
  from llava_jax import distributed
  distributed.add_flags(p)
  args, rest = p.parse_known_args(argv)
  overrides, i = [], 0
  while i < len(rest):
    item = rest[i]
    if not item.startswith('--config.'):
      p.error(f'unrecognized argument {item!r} (overrides look like --config.optim.lr=1e-3)')
    item = item[len('--config.'):]
    if '=' not in item:
      if i + 1 >= len(rest):
        p.error(f'--config.{item} needs a value')
      item, i = f'{item}={rest[i + 1]}', i + 1
    overrides.append(item)
    i += 1
  return args, overrides


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  if args.dry_run:  # one process, simulated devices: before jax starts
    from llava_jax.train import dry_run
    return dry_run.main(args.config, overrides, args.workdir)
  from llava_jax import distributed
  distributed.initialize(distributed.from_flags(args))  # before anything touches devices; no-op for one process
  import jax

  from llava_jax import config as config_lib
  from llava_jax.train import run
  try:
    config = config_lib.load(args.config, overrides, args.workdir)
    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if args.validate_only:
    print('config OK')
    return 0
  try:
    result = run.run(config)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 143 if result.get('status') == 'preempted' else 0


if __name__ == '__main__':
  sys.exit(main())
