"""TFDS ArrayRecord builder without TensorFlow: bad records of every kind skipped and reported."""
import importlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import build as build_cli
from llava_jax.data.builder import LENGTHS_FILE, REPORT_FILE, build_dataset


def _sample(i, image='ok.png', q='<image>\nWhat is it?', a='A square.'):
  s = {'id': f's{i}', 'conversations': [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]}
  if image:
    s['image'] = image
  return s


@pytest.fixture(scope='module')
def fixture_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('build')
  images = root / 'images'
  images.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(images / 'ok.png')
  Image.fromarray(rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)).save(images / 'ok.jpg', quality=90)
  (images / 'truncated.jpg').write_bytes((images / 'ok.jpg').read_bytes()[:200])
  (images / 'text.png').write_bytes(b'this is not a png')
  good = [_sample(0), _sample(1, 'ok.jpg'), _sample(2, image=None, q='Say hi.', a='Hi!'),
          _sample(3, q='Two turns <image>', a='One.') | {'conversations': [
              {'from': 'human', 'value': 'Two turns <image>'}, {'from': 'gpt', 'value': 'One.'},
              {'from': 'human', 'value': 'More?'}, {'from': 'gpt', 'value': 'Two.'}]}]
  bad = [
      ('missing_image', _sample(10, 'nope/missing.png')),
      ('undecodable_image', _sample(11, 'truncated.jpg')),
      ('undecodable_image', _sample(12, 'text.png')),
      ('no_gpt_turn', _sample(13) | {'conversations': [{'from': 'human', 'value': '<image>\nHello?'}]}),
      ('image_token_count', _sample(14, q='No placeholder here.')),
      ('image_token_count', _sample(15, image=None, q='<image>\nText-only with a placeholder.')),
      ('image_token_count', _sample(16, q='<image>\n<image>\nTwo.')),
      ('malformed', {'id': 's17', 'image': 'ok.png'}),
      ('malformed', {'id': 's18', 'conversations': [{'from': 'human', 'value': 3}]}),
      ('malformed', {'id': 's19', 'conversations': [{'from': 'martian', 'value': 'x'}, {'from': 'gpt', 'value': 'y'}]}),
      ('malformed', {'conversations': _sample(20)['conversations'], 'image': 'ok.png'}),
      ('malformed', ['not', 'an', 'object']),
  ]
  data = good[:2] + [b for _, b in bad[:6]] + good[2:] + [b for _, b in bad[6:]]
  (root / 'data.json').write_text(json.dumps(data))
  lines = [json.dumps(_sample(30)), '{"id": "s31", "conversations": [', json.dumps(_sample(32, 'ok.jpg'))]
  (root / 'data.jsonl').write_text('\n'.join(lines) + '\n')
  return dict(root=root, images=str(images), data=data, good=good, bad=bad)


@pytest.fixture(scope='module')
def built(fixture_dir):
  root = fixture_dir['root']
  report = build_dataset({'train': str(root / 'data.json'), 'extra': str(root / 'data.jsonl')},
                         fixture_dir['images'], str(root / 'tfds'), name='llava_test', progress_every=5)
  return report


def test_tensorflow_is_not_installed_and_not_needed(built):
  with pytest.raises(ModuleNotFoundError):
    importlib.import_module('tensorflow')
  assert os.path.isfile(os.path.join(built['data_dir'], 'llava_test-train.array_record-00000-of-00001'))


def test_skip_report_counts_and_ids(fixture_dir, built):
  train = built['splits']['train']
  bad = fixture_dir['bad']
  assert (train['num_entries'], train['num_written'], train['num_skipped']) == (16, 4, 12)
  expected = {}
  for reason, _ in bad:
    expected[reason] = expected.get(reason, 0) + 1
  assert train['skipped_by_reason'] == expected
  index_of = {id(e): i for i, e in enumerate(fixture_dir['data'])}
  assert [(s['index'], s['reason']) for s in train['skipped']] == sorted(
      (index_of[id(b)], r) for r, b in bad)
  assert {s['id'] for s in train['skipped']} == {f's{i}' for i in range(10, 20)} | {None}
  with open(os.path.join(built['data_dir'], REPORT_FILE)) as f:
    assert json.load(f)['splits']['train']['skipped'] == train['skipped']
  extra = built['splits']['extra']  # JSONL: a line that does not parse is a malformed record
  assert (extra['num_written'], extra['skipped_by_reason']) == (2, {'malformed': 1})
  assert extra['skipped'][0]['index'] == 1 and 'line 2' in extra['skipped'][0]['detail']


def test_records_read_back_without_tensorflow(fixture_dir, built):
  import tensorflow_datasets as tfds
  root = fixture_dir['root']
  source = tfds.data_source('llava_test', data_dir=str(root / 'tfds'), split='train')
  from_dir = tfds.builder_from_directory(built['data_dir']).as_data_source(split='train')
  assert len(source) == len(from_dir) == 4
  for i, expected in enumerate(fixture_dir['good']):  # JSON order is kept
    rec = source[i]
    assert rec['id'].decode() == expected['id'] == from_dir[i]['id'].decode()
    assert json.loads(rec['conversations']) == expected['conversations']
    image = expected.get('image')
    assert [p.decode() for p in rec['image_path']] == ([image] if image else [])
    assert rec['image'] == ([open(os.path.join(fixture_dir['images'], image), 'rb').read()] if image else [])
  with open(os.path.join(built['data_dir'], LENGTHS_FILE)) as f:
    lengths = json.load(f)
  assert lengths['train'] == [6, 6, -3, 6]  # words incl. '<image>'; negative: text-only and len(lengths['extra']) == 2


def test_cli(fixture_dir, built, capsys):
  root = fixture_dir['root']
  args = ['--json', str(root / 'data.json'), '--images', fixture_dir['images'], '--out', str(root / 'tfds'),
          '--name', 'llava_test']
  assert build_cli.main(args) == 1  # exists: refuses without --overwrite
  assert 'overwrite' in capsys.readouterr().err
  assert build_cli.main(args + ['--overwrite', '--progress-every', '4']) == 0
  out = capsys.readouterr()
  assert 'train: 4 written, 12 skipped of 16 entries' in out.out and '[build train] 16/16' in out.out
  # Nothing is downloaded: tfds' "Downloading and preparing dataset Unknown size ..." lines are not printed.
  assert 'Downloading' not in out.out + out.err and 'downloaded and prepared' not in out.out + out.err
  assert REPORT_FILE in out.err
  (root / 'broken.json').write_text('[{"id": 1,')
  assert build_cli.main(['--json', str(root / 'broken.json'), '--out', str(root / 'tfds2')]) == 1
  assert 'broken.json: not valid JSON' in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    build_cli.main(['--help'])
  assert e.value.code == 0
