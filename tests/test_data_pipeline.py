"""grain pipeline: fixed shapes, exact rows, determinism, checkpointable state, per-process shards,
modality grouping, padding-waste and truncation/drop counts, worker processes."""
import json
import os

import numpy as np
import pytest

from data_fixtures import batches_equal, build_demo_data, take
from llava_jax.data.builder import build_dataset
from llava_jax.data.image import load_image, preprocess_image
from llava_jax.data.pipeline import (BATCH_KEYS, dataset_size, epoch_order, make_pipeline, modality_grouped_order,
                                     open_source, record_images, steps_per_epoch)
from llava_jax.data.tokenize import IGNORE_INDEX, image_token_id, tokenize_conversation

N_IMG, SIZE, MAX_LEN = 16, 32, 192


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('pipe'))
  d = build_demo_data(root, num_train=12, image_size=SIZE)  # 36 image samples (stage 2)
  # A mixed set for modality grouping: the 36 image samples + 14 text-only ones = 50 records.
  with open(d['meta']['paths']['stage2']) as f:
    samples = json.load(f)
  text_only = [{'id': f'text_{i}', 'conversations': [dict(t, value=t['value'].replace('<image>\n', ''))
                                                      for t in s['conversations']]} for i, s in enumerate(samples[:14])]
  mixed = os.path.join(root, 'mixed.json')
  with open(mixed, 'w') as f:
    json.dump(samples + text_only, f)
  d['mixed_dir'] = build_dataset({'train': mixed}, d['meta']['paths']['images'], os.path.join(root, 'tfds'),
                                 name='mixed', progress_every=0)['data_dir']
  return d


def _pipe(data, **kw):
  args = dict(split='train', tokenizer=data['tokenizer'], template='vicuna_v1', num_image_tokens=N_IMG,
              image_size=SIZE, image_aspect='square', max_length=MAX_LEN, global_batch_size=8, seed=0,
              num_epochs=2, shuffle=True, group_by_length=False, worker_count=0, process_index=0,
              process_count=1, with_index=True)
  args.update(kw)
  return make_pipeline(kw.pop('data_dir', data['data_dir']), **{k: v for k, v in args.items() if k != 'data_dir'})




def test_batches_have_fixed_shapes_and_exact_rows(data):
  it = _pipe(data, num_epochs=1)
  assert (it.num_records, it.steps_per_epoch, it.num_steps, it.batch_size) == (36, 5, 5, 8)
  assert it.examples_per_epoch == 40 and dataset_size(data['data_dir'], 'train') == 36
  batches = take(it)
  assert len(batches) == 5
  source = open_source(data['data_dir'], 'train')
  tok, image_id = data['tokenizer'], image_token_id(data['tokenizer'])
  for b in batches:
    assert set(b) == set(BATCH_KEYS) | {'index'}
    assert b['input_ids'].shape == b['labels'].shape == b['attention_mask'].shape == (8, MAX_LEN)
    assert b['input_ids'].dtype == b['labels'].dtype == b['attention_mask'].dtype == np.int32
    assert b['pixel_values'].shape == (8, SIZE, SIZE, 3) and b['pixel_values'].dtype == np.float32
    assert b['has_image'].dtype == bool
    for r in range(8):
      index, mask = int(b['index'][r]), b['attention_mask'][r]
      n = int(mask.sum())
      assert (mask[:n] == 1).all() and (b['labels'][r][n:] == IGNORE_INDEX).all()
      if index < 0:  # padding row: one attended BOS, nothing supervised, no image
        assert n == 1 and (b['labels'][r] == IGNORE_INDEX).all() and not b['has_image'][r]
        assert not b['pixel_values'][r].any()
        continue
      rec = source[index]
      ref = tokenize_conversation(json.loads(rec['conversations']), tok, 'vicuna_v1', N_IMG, MAX_LEN)
      np.testing.assert_array_equal(b['input_ids'][r][:n], ref['input_ids'])
      np.testing.assert_array_equal(b['labels'][r][:n], ref['labels'])
      assert b['has_image'][r] and (b['input_ids'][r] == image_id).sum() == N_IMG
      np.testing.assert_array_equal(b['pixel_values'][r], preprocess_image(load_image(record_images(rec)[0]), SIZE))
  seen = np.concatenate([b['index'] for b in batches])
  assert sorted(seen[seen >= 0].tolist()) == list(range(36)) and (seen < 0).sum() == 4
  stats = it.stats()
  masks = np.stack([b['attention_mask'] for b in batches])
  assert stats['pad_fraction'] == pytest.approx(1 - masks.mean())
  assert (stats['rows'], stats['padding_rows'], stats['dropped'], stats['truncated']) == (40, 4, 0, 0)
  plain = take(_pipe(data, num_epochs=1, with_index=False), 1)[0]
  assert set(plain) == set(BATCH_KEYS)


def test_deterministic_for_a_seed_and_reshuffled_per_epoch(data):
  a, b = take(_pipe(data)), take(_pipe(data))
  assert len(a) == 10 and batches_equal(a, b)
  other = take(_pipe(data, seed=1))
  assert not np.array_equal(np.concatenate([x['index'] for x in a]), np.concatenate([x['index'] for x in other]))
  epoch0 = np.concatenate([x['index'] for x in a[:5]])
  epoch1 = np.concatenate([x['index'] for x in a[5:]])
  assert not np.array_equal(epoch0, epoch1)
  for e in (epoch0, epoch1):
    assert sorted(e[e >= 0].tolist()) == list(range(36))
  ordered = np.concatenate([x['index'] for x in take(_pipe(data, shuffle=False, num_epochs=1))])
  assert ordered.tolist() == list(range(36)) + [-1] * 4


def test_state_restores_mid_epoch_to_the_same_batches(data):
  it = _pipe(data, num_epochs=3)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = take(it, 6)  # crosses the epoch boundary at batch 5
  stats = it.stats()
  restored = _pipe(data, num_epochs=3)
  restored.set_state(state)
  assert batches_equal(take(restored, 6), expected)
  assert restored.stats() == stats


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_shards_are_disjoint_and_cover_each_epoch(data, process_count):
  per_process = [take(_pipe(data, process_index=p, process_count=process_count)) for p in range(process_count)]
  steps = steps_per_epoch(36, 8)
  for p, batches in enumerate(per_process):
    assert len(batches) == 2 * steps and all(b['input_ids'].shape == (8 // process_count, MAX_LEN) for b in batches)
  for epoch in range(2):
    shards = [np.concatenate([b['index'] for b in batches[epoch * steps:(epoch + 1) * steps]]) for batches in per_process]
    real = [s[s >= 0] for s in shards]
    union = np.concatenate(real)
    assert len(union) == len(set(union.tolist())) == 36  # disjoint, covering
    assert sum((s < 0).sum() for s in shards) == steps * 8 - 36
    # Same global batches as a single process reading the whole global batch.
    whole = epoch_order(epoch, num_records=36, global_batch_size=8, process_count=process_count, seed=0, shuffle=True)
    step_rows = np.stack([np.concatenate([b['index'] for b in batches]) for batches in zip(
        *[pb[epoch * steps:(epoch + 1) * steps] for pb in per_process])])
    np.testing.assert_array_equal(step_rows.reshape(-1), whole)


def test_modality_grouping(data):
  lengths = np.array([5, -3, 7, -2, 9, 1, -8, 4, 6, -1, 2, 3])
  order = modality_grouped_order(lengths, megabatch=4, num_chunks=2, rng=np.random.default_rng(0))
  assert sorted(order.tolist()) == list(range(12))
  # 8 image samples: one full megabatch + a last one; 4 text-only: one last megabatch. The two last
  # megabatches go to the end together, sorted by index (as LLaVA-1.5).
  assert set(np.sign(lengths[order[:4]]).tolist()) == {1}
  assert order[4:].tolist() == sorted(order[4:].tolist()) and (lengths[order[4:]] < 0).sum() == 4
  # Inside a megabatch: longest first, split into 2 chunks of similar total length.
  mb = lengths[order[:4]]
  assert mb[0] == mb.max()
  # Through the pipeline on 36 image + 14 text-only records, global batch 8 over 2 processes.
  lengths = np.asarray(json.load(open(os.path.join(data['mixed_dir'], 'modality_lengths.json')))['train'])
  per_process = [take(_pipe(data, data_dir=data['mixed_dir'], group_by_length=True, num_epochs=1,
                             process_index=p, process_count=2)) for p in range(2)]
  assert len(per_process[0]) == steps_per_epoch(50, 8) == 7
  rows = [np.concatenate([a['index'], b['index']]) for a, b in zip(*per_process)]
  flat = np.concatenate(rows)
  assert sorted(flat[flat >= 0].tolist()) == list(range(50))
  for step, (r, a) in enumerate(zip(rows[:-2], per_process[0])):  # full megabatches: one modality each
    assert len(set(np.sign(lengths[r]).tolist())) == 1
    assert (a['has_image'] == (lengths[a['index']] > 0)).all()
  for r, a in zip(rows[:-2], per_process[0]):  # longest-first greedy split: process 0 gets the longest
    assert np.abs(lengths[r]).max() == np.abs(lengths[a['index']]).max()


def test_truncation_and_drops_are_counted(data):
  tok = data['tokenizer']
  source = open_source(data['data_dir'], 'train')
  lens = [len(tokenize_conversation(json.loads(source[i]['conversations']), tok, 'vicuna_v1', N_IMG, None)['input_ids'])
          for i in range(36)]
  max_len = int(np.median(lens))
  it = _pipe(data, max_length=max_len, num_epochs=1)
  batches = take(it)
  s = it.stats()
  assert s['truncated'] == sum(n > max_len for n in lens) > 0 and s['dropped'] == 0
  assert all(b['input_ids'].shape == (8, max_len) for b in batches)
  # Shorter than BOS + system prompt + image: every sample would lose image tokens -> empty rows.
  it = _pipe(data, max_length=20, num_epochs=1)
  batches = take(it)
  assert it.stats()['dropped'] == 36 and it.stats()['truncated'] == 36
  for b in batches:
    assert (b['labels'] == IGNORE_INDEX).all() and (b['attention_mask'].sum(1) == 1).all() and not b['has_image'].any()


def test_worker_processes_give_identical_batches(data):
  ref = take(_pipe(data, num_epochs=1))
  it = _pipe(data, num_epochs=1, worker_count=2)
  try:  # exact counts: waiting for the end of a worker stream costs seconds
    first = take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    rest = take(it, 3)
  finally:
    it.close()
  assert batches_equal(first + rest, ref)
  assert state['next_batch'] == 2
  # The state does not depend on the worker count: restore it without workers.
  it = _pipe(data, num_epochs=1, worker_count=0)
  it.set_state(state)
  assert batches_equal(take(it), rest)


def test_bad_arguments_are_named(data):
  with pytest.raises(ValueError, match='not divisible by 3'):
    _pipe(data, process_count=3)
  with pytest.raises(ValueError, match='unknown template'):
    _pipe(data, template='vicuna')
  with pytest.raises(ValueError, match='image_aspect'):
    _pipe(data, image_aspect='crop')
  with pytest.raises(ValueError, match="split 'test'"):
    _pipe(data, split='test')
  with pytest.raises(FileNotFoundError, match='modality_lengths'):
    os.rename(os.path.join(data['data_dir'], 'modality_lengths.json'), os.path.join(data['data_dir'], 'x.json'))
    try:
      _pipe(data, group_by_length=True)
    finally:
      os.rename(os.path.join(data['data_dir'], 'x.json'), os.path.join(data['data_dir'], 'modality_lengths.json'))
