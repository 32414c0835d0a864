"""The demo pipeline (configs/demo.py) at a very small scale, and the demo QA scoring.

The full demo's accuracy target is checked by running it (see the report); here: the pipeline runs every stage
with the real stage machinery (stage 1 changes only the projector, stage 2 never the encoder), resumes as a
no-op, and writes results.json with the chance level of its QA set. The vision warm-up's labels are exact and its
training fits them.
"""
import json
import os

import jax
import numpy as np
import pytest

from llava_jax import model_dir
from llava_jax.demo import pipeline, qa, vision_warmup
from llava_jax.train import cli, config_checks, partition

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, 'configs', 'demo.py')
SMALL = ['demo.num_train_images=24', 'demo.num_qa=8', 'demo.num_vqa_train=16', 'eval.batch_size=8',
         'eval.max_new_tokens=2', 'vision_warmup.steps=2', 'vision_warmup.batch_size=8',
         'stages.warmup.train.steps=2', 'stages.stage1.train.steps=2', 'stages.stage2.train.steps=2',
         'stages.warmup.data.global_batch_size=8', 'stages.stage1.data.global_batch_size=8',
         'stages.stage2.data.global_batch_size=8']


def test_score_and_chance():
  items = [{'question': 'q', 'answer': 'red', 'choices': ['red', 'green', 'blue', 'yellow'], 'type': 'color'},
           {'question': 'q', 'answer': 'yes', 'choices': ['yes', 'no'], 'type': 'exists'},
           {'question': 'q', 'answer': 'two', 'choices': ['one', 'two', 'three'], 'type': 'count'}]
  s = qa.score(items, [' Red.', 'no', ' two shapes'])
  assert s['accuracy'] == pytest.approx(2 / 3)
  assert s['by_type'] == {'color': 1.0, 'count': 1.0, 'exists': 0.0}
  assert qa.chance_accuracy(items) == pytest.approx((1 / 4 + 1 / 2 + 1 / 3) / 3)


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('demo')
  config = cli.load(DEMO, SMALL, workdir=str(workdir))
  pipeline.validate(config, num_devices=jax.device_count())
  return workdir, config, pipeline.run(config)


def _params(path):
  config, _ = model_dir.load_config(path)
  return partition.flatten(jax.device_get(model_dir.load_params(path, config)))


def test_demo_pipeline_runs_every_stage_and_writes_results(demo_run):
  workdir, _, result = demo_run
  assert result['status'] == 'completed'
  scores = json.loads((workdir / 'results.json').read_text())
  meta = json.loads((workdir / 'data' / 'meta.json').read_text())
  assert scores['num_questions'] == 8
  assert scores['chance_accuracy'] == pytest.approx(meta['chance_accuracy'], abs=1e-4)
  for key in ('accuracy', 'blind_accuracy'):
    assert 0.0 <= scores[key] <= 1.0
  assert set(scores['accuracy_by_type']) <= {'color', 'shape', 'count', 'exists'}


def test_demo_stages_freeze_what_the_paper_freezes(demo_run):
  workdir, _, _ = demo_run
  vision, warm, s1, s2 = (_params(str(workdir / name / 'model'))
                          for name in ('vision_warmup', 'warmup', 'stage1', 'stage2'))
  changed = lambda a, b, prefix: [k for k in a if k.startswith(prefix) and not np.array_equal(a[k], b[k])]
  # The LLM warm-up loads the vision warm-up's tower and keeps it frozen (the stage-2 mask).
  assert not changed(vision, warm, 'vision_tower/')
  assert changed(vision, warm, 'projector/') and changed(vision, warm, 'language_model/')
  # Stage 1: encoder and LLM loaded from the warm-up and frozen; the projector is fresh and trained.
  assert not changed(warm, s1, 'vision_tower/') and not changed(warm, s1, 'language_model/')
  assert changed(warm, s1, 'projector/')
  # Stage 2: projector from stage 1 and LLM train; the encoder is still the warm-up's.
  assert not changed(warm, s2, 'vision_tower/')
  assert changed(s1, s2, 'projector/') and changed(warm, s2, 'language_model/')


def test_rerunning_a_finished_demo_does_not_train_again(demo_run):
  workdir, config, _ = demo_run
  before = (workdir / 'stage2' / 'metrics.jsonl').read_text()
  result = pipeline.run(config)
  assert result['status'] == 'completed'
  assert (workdir / 'stage2' / 'metrics.jsonl').read_text() == before


def _coco(images, annotations, size=64):
  cats = [dict(id=i + 1, name=n) for i, n in enumerate(['red circle', 'red square', 'blue circle', 'blue square'])]
  return dict(images=[dict(id=i, file_name=f, width=size, height=size) for i, f in enumerate(images)],
              annotations=[dict(image_id=i, category_id=c, bbox=b) for i, c, b in annotations], categories=cats)


def test_patch_labels_put_each_object_in_the_patch_of_its_box_centre(tmp_path):
  path = tmp_path / 'instances.json'
  # image 0: a blue circle whose box straddles patches 0 and 1 but is centred in 1; a red square in patch 2.
  # image 1: a blue square in patch 3.
  path.write_text(json.dumps(_coco(['a.png', 'b.png'], [(0, 3, [20, 2, 30, 20]), (0, 2, [4, 36, 20, 20]),
                                                        (1, 4, [40, 40, 20, 20])])))
  files, labels = vision_warmup.patch_labels(str(path), 64, 32)
  assert files == ['a.png', 'b.png']
  # colours sorted: blue=1, red=2; shapes: circle=1, square=2; object = category id; 0 = no object
  np.testing.assert_array_equal(labels['colour'], [[0, 1, 2, 0], [0, 0, 0, 1]])
  np.testing.assert_array_equal(labels['shape'], [[0, 1, 2, 0], [0, 0, 0, 2]])
  np.testing.assert_array_equal(labels['object'], [[0, 3, 2, 0], [0, 0, 0, 4]])


def test_patch_labels_reject_bad_input(tmp_path):
  path = tmp_path / 'instances.json'
  path.write_text(json.dumps(_coco(['a.png'], [], size=48)))
  with pytest.raises(ValueError, match=r'a\.png is 48x48, the model takes 64x64'):
    vision_warmup.patch_labels(str(path), 64, 32)
  bad = _coco(['a.png'], [])
  bad['categories'][0]['name'] = 'red'
  path.write_text(json.dumps(bad))
  with pytest.raises(ValueError, match='categories must be named "colour shape"'):
    vision_warmup.patch_labels(str(path), 64, 32)


def test_vision_warmup_fits_its_training_patches(demo_run, tmp_path):
  workdir, config, _ = demo_run
  (tmp_path / 'data').symlink_to(workdir / 'data')
  cfg = config.vision_warmup.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.steps, cfg.batch_size = 40, 24
  model_config = config_checks.model_config(config.stages.warmup)
  out = vision_warmup.train(cfg, model_config, str(tmp_path), log=lambda _: None)
  metrics = json.loads((tmp_path / 'vision_warmup' / 'metrics.json').read_text())
  assert metrics['steps'] == 40 and metrics['last_loss'] < 0.3 * metrics['first_loss'], metrics
  assert set(metrics['held_out_patch_accuracy']) == {'colour', 'shape', 'object'}
  # The export is a whole LLaVA model (the stages load it with init.vision_from) with the trained tower.
  params = _params(out)
  two_steps = _params(str(workdir / 'vision_warmup' / 'model'))  # the pipeline's, 2 steps
  assert params.keys() == two_steps.keys()
  assert any(not np.array_equal(params[k], two_steps[k]) for k in params if k.startswith('vision_tower/'))
