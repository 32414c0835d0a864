"""python -m llava_jax.train --config configs/X.py[:arg] [--config.a.b=VALUE ...] [--workdir DIR]

Examples:
  python -m llava_jax.train --config configs/stage1_pretrain.py:llava15_7b --workdir runs/s1 \\
      --config.data.train_dir=data/lcs558k --config.data.tokenizer=hf/vicuna-7b-v1.5 \\
      --config.init.vision_from=hf/clip-vit-large-patch14-336 --config.init.llm_from=hf/vicuna-7b-v1.5
  python -m llava_jax.train --config configs/stage2_finetune.py:llava15_7b --workdir runs/s2 \\
      --config.init.projector_from=runs/s1/model ...
  python -m llava_jax.train --config configs/scale.py:7b_stage2_8xh100 --dry_run   # memory per device, fits?

The config is validated once, before anything compiles; rerunning with the same --workdir resumes.
The demo (configs/demo.py, several stages) runs with python -m llava_jax.demo.
Several processes (one per host or GPU): see launch/ and llava_jax/distributed.py; on SLURM, Open MPI and TPU
pods nothing needs setting, elsewhere --coordinator/--num_processes/--process_id (or LLAVA_* env).
Exit status: 0 done, 1 bad config / error, 143 stopped by SIGTERM after saving a checkpoint, 2 dry run: does not
fit; a peer process that died makes the others abort (134) within the heartbeat timeout.
"""
from __future__ import annotations

import sys

from absl import flags

from llava_jax.train import cli, config_checks


def _define_dry_run(fv: flags.FlagValues) -> None:
  flags.DEFINE_boolean('dry_run', False, 'compile the train step for the configured mesh on simulated CPU devices, '
                       'print memory per device and whether it fits hardware.hbm_gib; allocates no weights '
                       '(llava_jax/train/dry_run.py)', flag_values=fv)
  flags.DEFINE_alias('dry-run', 'dry_run', flag_values=fv)


def main(argv=None) -> int:
  parsed = cli.command_line('python -m llava_jax.train', __doc__, argv, define=_define_dry_run)
  if isinstance(parsed, int):
    return parsed
  fv, config = parsed
  spec = fv['config'].config_filename
  if 'stages' in config:
    return cli.fail(f'{spec} is a pipeline of stages (the demo); run it with python -m llava_jax.demo --config {spec}')
  if fv['dry_run'].value:  # one process, simulated devices: before jax starts
    from llava_jax.train import dry_run
    return dry_run.main(config, name=spec)
  from llava_jax.train import trainer
  return cli.start_and_run(fv, config, config_checks.validate, lambda c: trainer.train(c, c.workdir))


if __name__ == '__main__':
  sys.exit(main())
