"""Run a validated config: one stage, or a pipeline (demo data preparation -> stages in order -> QA eval).

A pipeline's stages are ordinary stage configs trained by the same `trainer.train`, each in `<workdir>/<name>`;
a later stage reads an earlier one's export through its `init.*_from` paths, exactly as a user chains
stage 1 and stage 2 by hand.
"""
from __future__ import annotations

import json
import os
import time

import jax

from llava_jax import config as config_lib
from llava_jax.train import metrics, trainer


def run(config) -> dict:
  if not config_lib.is_pipeline(config):
    return trainer.train(config, config.workdir)
  t0 = time.perf_counter()
  workdir = os.path.abspath(config.workdir)
  if 'demo' in config:
    from llava_jax.train import demo
    demo.prepare(config.demo, workdir, log=metrics.log)
    if 'vision_warmup' in config:  # the stages' model: the first stage's (all of a pipeline's stages share it)
      metrics.log('=== vision warm-up ===')
      demo.warmup_vision(config.vision_warmup, config_lib.model_config(config.stages[config.stage_order[0]]),
                         workdir, log=metrics.log)
  result, trained = {'status': 'completed'}, False
  for name in config.stage_order:
    stage = config.stages[name]
    # Paths written by earlier steps of this pipeline exist only now: check them before this stage compiles.
    errors = config_lib.validate_stage(stage, num_devices=jax.device_count(), process_count=jax.process_count(),
                                       prefix=f'stages.{name}.')
    if errors:
      raise config_lib.ConfigError('invalid config:\n  ' + '\n  '.join(errors))
    metrics.log(f'=== stage {name} ===')
    result = trainer.train(stage, os.path.join(workdir, name))
    if result['status'] != 'completed':
      return result
    trained = trained or bool(result['losses'])
  results_file = os.path.join(workdir, 'results.json')
  if 'eval' in config and not trained and os.path.isfile(results_file):
    metrics.log(f'nothing trained in this run; scores stay in {results_file}')
  elif 'eval' in config:
    from llava_jax.eval import demo_qa
    scores = demo_qa.evaluate_demo(config, workdir, log=metrics.log)
    scores['wall_time_s'] = round(time.perf_counter() - t0, 1)
    if jax.process_index() == 0:
      with open(results_file, 'w') as f:
        json.dump(scores, f, indent=2)
      metrics.log(f'results ({results_file}): ' + json.dumps(scores))
    result['results'] = scores
  return result
