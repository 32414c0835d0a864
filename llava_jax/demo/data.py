"""The demo's data (configs/demo.py, its `demo` section), created under `<workdir>/data` when missing:

  <workdir>/data/           images/, stage1.json (captions), stage2.json (instructions), qa.json (held out),
                            annotations/ (COCO), tokenizer/, meta.json   (llava_jax.demo.synthetic.write_demo)
                            vqa_train.json, demo_stage2.json (instructions + vqa_train)     (below)
  <workdir>/data/tfds/      demo_stage1 (captions), demo_stage2          (llava_jax.data.builder)

Stage 2 reads the instruction samples of the kinds in `stage2_kinds` (conversation / detail / reasoning). Like
LLaVA-1.5's mix665k, which adds academic VQA data with the short-answer prompt to the instructions, it also holds
`num_vqa_train` short-answer questions drawn the way the held-out QA is drawn (every answer of a question equally
often; other images, other random streams). Without them the instruction data's yes/no questions are mostly "no",
which a small model learns as a prior.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np

# TFDS name -> the LLaVA JSON files it is built from
DATASETS = {'demo_stage1': ('stage1.json',), 'demo_stage2': ('stage2.json', 'vqa_train.json')}
_VQA_STREAM = 7  # random stream of the training questions; held-out QA uses streams 1 and 3 of synthetic.py


def data_dir(workdir: str) -> str:
  return os.path.join(workdir, 'data')


def _built(path: str) -> bool:
  from llava_jax.data.pipeline import find_dataset_dir
  try:
    find_dataset_dir(path)
    return True
  except FileNotFoundError:
    return False


def write_vqa_train(root: str, num: int, *, max_objects: int, image_size: int, seed: int) -> list[dict]:
  """`num` single-turn short-answer samples on new images, answers balanced per question (LLaVA JSON)."""
  from llava_jax.demo import synthetic
  plan = synthetic.qa_plan(num, max_objects, seed + 1)  # another shuffle of the combos than the held-out set
  samples = []
  for i, (qtype, combo) in enumerate(plan):
    scene, item = synthetic.qa_scene(np.random.default_rng([seed, _VQA_STREAM, i]), qtype, combo, max_objects)
    name = f'vqa_{i:06d}.png'
    synthetic.draw(scene, image_size).save(os.path.join(root, 'images', name))
    samples.append({'id': f'vqa_{i:06d}', 'image': name, 'conversations': [
        {'from': 'human', 'value': '<image>\n' + item['question']}, {'from': 'gpt', 'value': item['answer']}]})
  return samples


def write_json(obj, path: str) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f)
  os.replace(path + '.tmp', path)


def _same_settings(meta_path: str, wanted: dict) -> bool:
  with open(meta_path) as f:
    have = json.load(f)['config']
  return all(have.get(k) == v for k, v in wanted.items())


def prepare(demo, workdir: str, log: Callable[[str], None] = print) -> None:
  """`demo`: the config's `demo` section. Only process 0 writes; the others wait for it."""
  from llava_jax.data import builder
  from llava_jax.demo import synthetic
  root = data_dir(workdir)
  meta = os.path.join(root, 'meta.json')
  settings = dict(num_train=demo.num_train_images, num_qa=demo.num_qa, image_size=demo.image_size,
                  max_objects=demo.max_objects, seed=demo.seed, vocab_size=demo.vocab_size,
                  conversations_per_image=demo.conversations_per_image)
  vqa_file = os.path.join(root, 'vqa_train.json')
  if jax.process_index() == 0:
    if os.path.isfile(meta) and not _same_settings(meta, settings):
      raise ValueError(f'{root} holds a demo dataset made with other demo.* settings than {settings}; use another '
                       '--workdir or delete it')
    if not os.path.isfile(meta):
      log(f'demo: drawing {demo.num_train_images} training and {demo.num_qa} held-out QA images into {root}')
      synthetic.write_demo(root, progress_every=0, **settings)
    if not os.path.isfile(vqa_file):
      vqa = write_vqa_train(root, demo.num_vqa_train, max_objects=demo.max_objects, image_size=demo.image_size,
                            seed=demo.seed)
      write_json(vqa, vqa_file)
      log(f'demo: {len(vqa)} short-answer training questions in {vqa_file}')
    for name, sources in DATASETS.items():
      if _built(os.path.join(root, 'tfds', name)):
        continue
      mixed = os.path.join(root, f'{name}.json')
      samples = []
      for source in sources:
        with open(os.path.join(root, source)) as f:
          samples += [x for x in json.load(f)
                      if source != 'stage2.json' or synthetic.sample_kind(x['id']) in demo.stage2_kinds]
      write_json(samples, mixed)
      # overwrite: a build that was interrupted
      report = builder.build_dataset({'train': mixed}, os.path.join(root, 'images'), os.path.join(root, 'tfds'),
                                     name=name, overwrite=True)
      r = report['splits']['train']
      log(f'demo: built {name} from {" + ".join(sources)}: {r["num_written"]} records, {r["num_skipped"]} skipped')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('demo data ready')
