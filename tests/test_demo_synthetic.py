"""Built-in demo dataset: deterministic, answers true to the pixels and boxes, QA balanced to chance."""
import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from llava_jax.demo import synthetic
from llava_jax.data.builder import check_entry
from llava_jax.demo.synthetic import (BRIEF_INSTRUCTIONS, COLORS, NUMBERS, SHORT_ANSWER, build_demo_tokenizer,
                                      normalize_answer, write_demo)
from llava_jax.data.tokenize import add_image_token

SIZE = 48


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  root = tmp_path_factory.mktemp('synthetic')
  meta = write_demo(str(root / 'a'), num_train=8, num_qa=192, image_size=SIZE, max_objects=3, seed=3,
                    progress_every=0)
  return root, meta


def _load(path):
  with open(path) as f:
    return json.load(f)


def _objects(meta, split):
  """image file -> [(category name, box in pixels x1 y1 x2 y2)] from the COCO instances file."""
  inst = _load(meta['paths'][f'instances_{split}'])
  names = {c['id']: c['name'] for c in inst['categories']}
  files = {im['id']: im['file_name'] for im in inst['images']}
  out = {f: [] for f in files.values()}
  for a in inst['annotations']:
    x, y, w, h = a['bbox']
    out[files[a['image_id']]].append((names[a['category_id']], (x, y, x + w, y + h)))
  return out


def _answer(question, objects):
  """Answers a demo question from the boxes alone (the oracle)."""
  q = question.split('\n')[0]
  cats = [c for c, _ in objects]
  if q.startswith('What color is the '):
    shape = q[len('What color is the '):-1]
    (match,) = [c for c in cats if c.endswith(' ' + shape)]
    return match.split()[0]
  if q.startswith('What shape is the '):
    color = q[len('What shape is the '):-len(' object?')]
    (match,) = [c for c in cats if c.startswith(color + ' ')]
    return match.split()[1]
  if q.startswith('How many shapes'):
    return NUMBERS[len(cats)]
  if q.startswith('Is there a '):
    return 'yes' if q[len('Is there a '):-1] in cats else 'no'
  raise AssertionError(q)


def test_deterministic_and_independent_of_size(demo, tmp_path):
  root, meta = demo
  again = write_demo(str(tmp_path / 'b'), num_train=8, num_qa=192, image_size=SIZE, max_objects=3, seed=3,
                     progress_every=0)
  for key in ('stage1', 'stage2', 'qa', 'captions_train', 'instances_qa'):
    assert filecmp.cmp(meta['paths'][key], again['paths'][key], shallow=False), key
  assert filecmp.cmp(os.path.join(meta['paths']['tokenizer'], 'tokenizer.json'),
                     os.path.join(again['paths']['tokenizer'], 'tokenizer.json'), shallow=False)
  images = sorted(os.listdir(meta['paths']['images']))
  assert len(images) == 8 + 192
  assert all(filecmp.cmp(os.path.join(meta['paths']['images'], f), os.path.join(again['paths']['images'], f),
                         shallow=False) for f in images)
  fewer = write_demo(str(tmp_path / 'c'), num_train=3, num_qa=0, image_size=SIZE, max_objects=3, seed=3,
                     tokenizer=False, progress_every=0)
  for i in range(3):  # image i does not depend on how many are drawn
    f = f'train_{i:06d}.png'
    assert filecmp.cmp(os.path.join(meta['paths']['images'], f), os.path.join(fewer['paths']['images'], f), shallow=False)
  other = write_demo(str(tmp_path / 'd'), num_train=1, num_qa=0, image_size=SIZE, seed=4, tokenizer=False,
                     progress_every=0)
  assert not filecmp.cmp(os.path.join(meta['paths']['images'], 'train_000000.png'),
                         os.path.join(other['paths']['images'], 'train_000000.png'), shallow=False)


def test_pixels_match_the_boxes(demo):
  _, meta = demo
  for split in ('train', 'qa'):
    for fname, objects in list(_objects(meta, split).items())[:40]:
      img = np.asarray(Image.open(os.path.join(meta['paths']['images'], fname)))
      assert img.shape == (SIZE, SIZE, 3) and 1 <= len(objects) <= 3
      covered = np.zeros((SIZE, SIZE), bool)
      for name, (x1, y1, x2, y2) in objects:
        color, shape = name.split()
        cx, cy = int((x1 + x2) / 2), int(y1 + (y2 - y1) * (0.7 if shape == 'triangle' else 0.5))
        assert tuple(img[cy, cx]) == COLORS[color], (fname, name)
        assert x2 - x1 >= 0.6 * SIZE / 2  # large shapes: at least 60% of a grid cell
        covered[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = True
      assert (img[~covered] == 255).all()  # white outside every box


def test_qa_is_correct_and_balanced_to_chance(demo):
  _, meta = demo
  qa = _load(meta['paths']['qa'])
  objects = _objects(meta, 'qa')
  assert len(qa) == 192 and set(qa[0]) == {'id', 'image', 'question', 'answer', 'choices', 'type'}
  for item in qa:
    assert item['question'].endswith('\n' + SHORT_ANSWER) and item['answer'] in item['choices']
    assert _answer(item['question'], objects[item['image']]) == item['answer'], item
    assert normalize_answer(f' {item["answer"].upper()}.') == item['answer']
  by_question = {}
  for item in qa:
    by_question.setdefault(item['question'], []).append(item['answer'])
  for question, answers in by_question.items():  # every answer equally often for each question text
    item = next(i for i in qa if i['question'] == question)
    counts = [answers.count(c) for c in item['choices']]
    assert len(set(counts)) == 1, (question, counts)
  chance = np.mean([1 / len(i['choices']) for i in qa])
  assert meta['chance_accuracy'] == pytest.approx(chance) == pytest.approx((1 / 4 + 1 / 3 + 1 / 3 + 1 / 2) / 4)
  assert meta['text_only_accuracy'] == pytest.approx(chance)
  assert meta['qa_types'] == {'color': 48, 'shape': 48, 'count': 48, 'exists': 48}


def test_llava_json_samples(demo):
  _, meta = demo
  stage1, stage2 = _load(meta['paths']['stage1']), _load(meta['paths']['stage2'])
  objects = _objects(meta, 'train')
  captions = {}
  caps = _load(meta['paths']['captions_train'])
  files = {im['id']: im['file_name'] for im in caps['images']}
  for a in caps['annotations']:
    captions.setdefault(files[a['image_id']], []).append(a['caption'])
  assert len(stage1) == 8 and all(len(c) == 5 for c in captions.values())
  for s in stage1:  # <image> + a brief instruction -> one of the image's captions
    human, gpt = s['conversations']
    assert human['value'].startswith('<image>\n') and human['value'][8:] in BRIEF_INSTRUCTIONS
    assert gpt['value'] in captions[s['image']]
  assert [s['id'].rsplit('_', 1)[1] for s in stage2[:3]] == ['conversation', 'detail', 'reasoning']
  assert len(stage2) == 24
  short = 0
  for s in stage2:
    record, _ = check_entry(s, lambda path: b'png')  # valid for the builder
    turns = s['conversations']
    assert turns[0]['value'].startswith('<image>\n') and sum('<image>' in t['value'] for t in turns) == 1
    for q, a in zip(turns[::2], turns[1::2]):
      if q['value'].endswith(SHORT_ANSWER):
        short += 1
        assert _answer(q['value'].replace('<image>\n', ''), objects[s['image']]) == a['value']
  assert short >= 8


def test_coco_files_and_symbolic_view(demo):
  _, meta = demo
  inst = _load(meta['paths']['instances_train'])
  assert {c['name'] for c in inst['categories']} == {f'{c} {s}' for c in COLORS for s in synthetic.SHAPES}
  assert all(im['width'] == im['height'] == SIZE for im in inst['images'])
  a = inst['annotations'][0]
  assert set(a) >= {'id', 'image_id', 'category_id', 'bbox', 'area', 'iscrowd'}
  scene = synthetic.place(np.random.default_rng(0), [('red', 'circle'), ('blue', 'square')], 2)
  view = scene.symbolic(synthetic.captions(scene))
  lines = view.split('\n')
  assert lines[5] == '' and lines[6].startswith('red circle: [') and len(lines) == 8


def test_demo_tokenizer(demo):
  _, meta = demo
  tok = AutoTokenizer.from_pretrained(meta['paths']['tokenizer'])
  assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
  n = len(tok)
  assert add_image_token(tok) == 4 and len(tok) == n  # <image> already special
  text = 'USER: <image>\nWhat color is the circle? ASSISTANT: red</s>'
  ids = tok(text)['input_ids']
  assert ids[0] == 1 and 4 in ids and ids[-1] == 2
  assert tok.decode(ids[1:]) == text
  words = tok.tokenize(' red circle triangle yellow')
  assert len(words) == 4  # demo words are single tokens
  small = build_demo_tokenizer(os.path.join(os.path.dirname(meta['paths']['tokenizer']), 'tok2'),
                               texts=['a b c'] * 3, vocab_size=300)
  assert small.decode(small('héllo 🙂', add_special_tokens=False)['input_ids']) == 'héllo 🙂'  # byte-level


def test_cli(tmp_path, capsys):
  assert synthetic.main(['--out', str(tmp_path / 'x'), '--num-train', '2', '--num-qa', '4', '--no-tokenizer',
                         '--image-size', '16', '--max-objects', '1', '--conversations-per-image', '3']) == 0
  out = capsys.readouterr().out
  assert 'wrote 2 stage-1, 10 stage-2 samples and 4 QA items' in out and 'llava_jax.data.build' in out
  stage2 = _load(str(tmp_path / 'x' / 'stage2.json'))
  assert [s['id'] for s in stage2[:5]] == ['train_000000_' + k for k in
                                          ('conversation', 'conversation1', 'conversation2', 'detail', 'reasoning')]
  qa = _load(str(tmp_path / 'x' / 'qa.json'))  # one shape per image: no counting questions
  assert {q['type'] for q in qa} == {'color', 'shape', 'exists'}
  assert synthetic.main(['--out', str(tmp_path / 'y'), '--max-objects', '12']) == 1
  assert 'max_objects' in capsys.readouterr().err


def test_captions_name_each_object_by_colour_and_by_shape():
  objs = (synthetic.Obj('red', 'circle', (0, 0, .4, .4), 'top left'),
          synthetic.Obj('blue', 'square', (.5, 0, .9, .4), 'top right'),
          synthetic.Obj('green', 'circle', (0, .5, .4, .9), 'bottom left'))
  assert synthetic.captions(synthetic.Scene(objs)) == [
      'A red circle, a blue square and a green circle.',
      'Three shapes on a white background: a red circle, a blue square and a green circle.',
      'An image of two circles and a square.',
      'A red circle in the top left, a blue square in the top right and a green circle in the bottom left.',
      'A simple drawing: a circle in red, a square in blue and a circle in green.']


def test_training_short_questions_are_true_and_exists_is_balanced():
  rng = np.random.default_rng(0)
  answers = {}
  for _ in range(3000):
    scene = synthetic.place(rng, synthetic.random_kinds(rng, int(rng.integers(1, 4))), 3)
    question, answer = synthetic.short_qa(scene, rng)
    boxes = [(o.name, o.box) for o in scene.objects]
    assert answer == _answer(question, boxes), question
    if question.startswith('Is there'):
      answers.setdefault(answer, 0)
      answers[answer] += 1
  total = answers['yes'] + answers['no']
  assert total > 500 and abs(answers['yes'] / total - 0.5) < 0.05, answers


def test_sample_kind_reads_the_stage2_ids(demo):
  _, meta = demo
  kinds = [synthetic.sample_kind(s['id']) for s in _load(meta['paths']['stage2'])]
  assert set(kinds) == {'conversation', 'detail', 'reasoning'} and len(kinds) == 8 * 3
  assert synthetic.sample_kind('train_000012_conversation1') == 'conversation'
