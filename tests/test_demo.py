"""The demo pipeline (configs/demo.py), shortened so that it runs in the suite yet still learns, and its QA scoring.

`SHORT` keeps every stage of the README command with a tenth of its data and steps (a vision warm-up of 60 steps,
50 + 30 + 300 steps of the three stages). It must answer the held-out QA better than `FLOOR` and beat its own
blind score (every image blank) by `MARGIN`. Measured on the 2-core machine (2026-12-02, 64 questions, chance
0.354): here (8 CPU devices) 0.656, blind 0.391; as one device 0.672, blind 0.359; as one device with the image
path broken (blank images in training and scoring) 0.359, blind 0.359, and with a broken stage-2 mask (projector
and LLM frozen, the encoder trained) 0.0. Besides: stage 1 changes only the projector, stage 2 never the encoder;
a rerun is a no-op; the vision warm-up learns the boxes.
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
SHORT = ['demo.num_train_images=300', 'demo.num_qa=64', 'demo.num_vqa_train=2000', 'vision_warmup.steps=60',
         'stages.warmup.train.steps=50', 'stages.stage1.train.steps=30', 'stages.stage2.train.steps=300']
FLOOR, MARGIN = 0.5, 0.15


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
  config = cli.load(DEMO, SHORT, workdir=str(workdir))
  pipeline.validate(config, num_devices=jax.device_count())
  return workdir, config, pipeline.run(config)


def _params(path):
  config, _ = model_dir.load_config(path)
  return partition.flatten(jax.device_get(model_dir.load_params(path, config)))


def test_demo_learns_to_look_at_the_image(demo_run):
  workdir, _, result = demo_run
  assert result['status'] == 'completed'
  scores = json.loads((workdir / 'results.json').read_text())
  meta = json.loads((workdir / 'data' / 'meta.json').read_text())
  assert scores['num_questions'] == 64
  assert scores['chance_accuracy'] == pytest.approx(meta['chance_accuracy'], abs=1e-4)
  assert scores['accuracy'] >= FLOOR, scores
  assert scores['accuracy'] - scores['blind_accuracy'] >= MARGIN, scores
  assert set(scores['accuracy_by_type']) == {'color', 'shape', 'count', 'exists'}


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


def test_vision_warmup_learns_the_patches(demo_run):
  """The pipeline's own warm-up: its loss falls, the held-out patches are named right, and its export is a whole
  LLaVA model (the stages load it with init.vision_from) in which only the tower differs from a fresh init."""
  from llava_jax.models.llava import init_params
  workdir, config, _ = demo_run
  metrics = json.loads((workdir / 'vision_warmup' / 'metrics.json').read_text())
  assert metrics['steps'] == 60 and metrics['last_loss'] < 0.3 * metrics['first_loss'], metrics
  accuracy = metrics['held_out_patch_accuracy']
  assert set(accuracy) == {'colour', 'shape', 'object'} and min(accuracy.values()) >= 0.7, accuracy
  params = _params(str(workdir / 'vision_warmup' / 'model'))
  model_config = config_checks.model_config(config.stages.warmup)
  fresh = partition.flatten(jax.device_get(init_params(model_config, jax.random.key(config.vision_warmup.seed))))
  assert params.keys() == fresh.keys()
  assert all(np.array_equal(params[k], fresh[k]) for k in params if not k.startswith('vision_tower/'))
  assert any(not np.array_equal(params[k], fresh[k]) for k in params if k.startswith('vision_tower/'))
