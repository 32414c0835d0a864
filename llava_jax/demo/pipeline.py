"""The demo pipeline (configs/demo.py): data preparation -> vision warm-up -> stages in order -> QA scoring.

Its stages are ordinary stage configs trained by the same `trainer.train`, each in `<workdir>/<name>`; a later
stage reads an earlier one's export through its `init.*_from` paths, exactly as a user chains stage 1 and stage 2
by hand. `validate` checks the demo's own sections and every stage (`llava_jax/train/config_checks.py`).
"""
from __future__ import annotations

import json
import os
import time

import jax

from llava_jax.train import config_checks as checks
from llava_jax.train import metrics, trainer

# The demo's own keys; sections `demo`, `vision_warmup` and `eval` are each optional as a whole.
CHECKS = {
    'demo.num_train_images': checks.positive,
    'demo.num_qa': checks.positive,
    'demo.image_size': checks.positive,
    'demo.max_objects': lambda v: None if 1 <= v <= 9 else 'must be in 1..9',
    'demo.vocab_size': checks.positive,
    'demo.conversations_per_image': checks.non_negative,
    'demo.num_vqa_train': checks.non_negative,
    'demo.stage2_kinds': lambda v: None if v and set(v) <= {'conversation', 'detail', 'reasoning'} else
                         "must be a non-empty subset of ('conversation', 'detail', 'reasoning')",
    'vision_warmup.steps': checks.positive,
    'vision_warmup.lr': checks.positive,
    'vision_warmup.batch_size': checks.positive,
    'eval.batch_size': checks.positive,
    'eval.max_new_tokens': checks.positive,
}
PATHS = {'eval.qa_file': 'any', 'eval.image_dir': 'dir'}


def errors(config, *, num_devices: int, process_count: int = 1, check_paths: bool = True) -> list[str]:
  """Every problem of the pipeline config; paths it writes itself need not exist yet."""
  out = checks.value_errors(config, CHECKS)
  names = list(config.stage_order)
  if not names:
    out.append('stage_order: must be a non-empty list of stage names')
  out += [f'stage_order: unknown stage {n!r}; defined: {sorted(config.stages.keys())}' for n in names
          if n not in config.stages]
  if 'vision_warmup' in config and 'demo' not in config:
    out.append("vision_warmup: needs the demo section (it trains on the demo dataset's boxes)")
  if 'eval' in config and config.eval.stage not in names:
    out.append(f'eval.stage={config.eval.stage!r}; allowed: {names}')
  if check_paths:
    out += checks.path_errors(config, PATHS, produced_under=config.workdir)
  for name in names:
    if name in config.stages:
      out += checks.stage_errors(config.stages[name], num_devices=num_devices, process_count=process_count,
                                 prefix=f'stages.{name}.', check_paths=check_paths, produced_under=config.workdir)
  return out


def validate(config, *, num_devices: int, process_count: int = 1, check_paths: bool = True) -> None:
  checks.raise_if(errors(config, num_devices=num_devices, process_count=process_count, check_paths=check_paths))


def run(config) -> dict:
  """Run (or resume) a validated pipeline config. Returns the last stage's result, with `results` (the scores)."""
  from llava_jax.demo import data, vision_warmup
  t0 = time.perf_counter()
  workdir = os.path.abspath(config.workdir)
  if 'demo' in config:
    data.prepare(config.demo, workdir, log=metrics.log)
    if 'vision_warmup' in config:  # the stages' model: the first stage's (all of a pipeline's stages share it)
      metrics.log('=== vision warm-up ===')
      vision_warmup.train(config.vision_warmup, checks.model_config(config.stages[config.stage_order[0]]),
                          workdir, log=metrics.log)
  result, trained = {'status': 'completed'}, False
  for name in config.stage_order:
    stage = config.stages[name]
    # Paths written by earlier steps of this pipeline exist only now: check them before this stage compiles.
    checks.raise_if(checks.stage_errors(stage, num_devices=jax.device_count(), process_count=jax.process_count(),
                                        prefix=f'stages.{name}.'))
    metrics.log(f'=== stage {name} ===')
    result = trainer.train(stage, os.path.join(workdir, name))
    if result['status'] != 'completed':
      return result
    trained = trained or bool(result['losses'])
  results_file = os.path.join(workdir, 'results.json')
  if 'eval' in config and not trained and os.path.isfile(results_file):
    metrics.log(f'nothing trained in this run; scores stay in {results_file}')
  elif 'eval' in config:
    from llava_jax.demo import qa
    e = config.eval
    scores = qa.evaluate(os.path.join(workdir, e.stage, 'model'), e.qa_file, e.image_dir, batch_size=e.batch_size,
                         max_new_tokens=e.max_new_tokens, log=metrics.log)
    scores['wall_time_s'] = round(time.perf_counter() - t0, 1)
    if jax.process_index() == 0:
      with open(results_file, 'w') as f:
        json.dump(scores, f, indent=2)
      metrics.log(f'results ({results_file}): ' + json.dumps(scores))
    result['results'] = scores
  return result
