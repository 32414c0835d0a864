"""python -m llava_jax.demo --config configs/demo.py[:arg] [--workdir DIR] [--config.KEY=VALUE ...]

Runs the demo pipeline of configs/demo.py under the work directory (default workdir/demo): data, vision warm-up,
the stages in `stage_order`, then the held-out QA scores in `<workdir>/results.json`. Rerunning resumes; a
finished run does nothing. Override any key as in training, e.g. --config.stages.stage2.train.steps=500.
Exit status: 0 done, 1 bad config / error, 143 stopped by SIGTERM after saving a checkpoint.
"""
from __future__ import annotations

import sys

from llava_jax.train import cli


def main(argv=None) -> int:
  parsed = cli.command_line('python -m llava_jax.demo', __doc__, argv)
  if isinstance(parsed, int):
    return parsed
  fv, config = parsed
  spec = fv['config'].config_filename
  if 'stages' not in config:
    return cli.fail(f'{spec} is one training stage, not the demo pipeline; run it with python -m llava_jax.train '
                    f'--config {spec}')
  from llava_jax.demo import pipeline
  return cli.start_and_run(fv, config, pipeline.validate, pipeline.run)


if __name__ == '__main__':
  sys.exit(main())
