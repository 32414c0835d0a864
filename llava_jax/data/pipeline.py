"""grain input pipeline: ArrayRecord (TFDS) -> fixed-shape, per-process training batches.

  order (per epoch, from seed) -> this process's slice -> read + decode + preprocess + tokenize
  -> batch [b = global_batch / process_count] -> worker processes (mp_prefetch) -> LlavaIterator

Every epoch is a permutation of all records (or LLaVA-1.5's modality/length grouping), cut into
ceil(N / global_batch) global batches; the last one is filled with padding rows (no supervised
token, `has_image` False) so nothing is dropped and shapes stay fixed. Global batch g holds
order[g*G : (g+1)*G]; process p takes rows [p*b, (p+1)*b) of it, so processes are disjoint and
together cover the epoch. Batches depend only on (seed, epoch, step): not on the worker count,
and the iterator state restores mid-epoch to the same following batches.

A sample whose image tokens would be cut by `max_length`, or left without supervised tokens, is
replaced by an empty row and counted (`stats()`), as are truncated samples and padding waste.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Optional, Sequence

import grain
import numpy as np

from llava_jax.data.builder import LENGTHS_FILE
from llava_jax.data.conversation import get_template
from llava_jax.data.image import ASPECTS, blank_image, load_image, preprocess_image
from llava_jax.data.tokenize import IGNORE_INDEX, image_token_id, tokenize_conversation

BATCH_KEYS = ('input_ids', 'labels', 'attention_mask', 'pixel_values', 'has_image')
_STAT_KEYS = ('truncated', 'dropped', 'padding_row')


# ----------------------------------------------------------------------------- dataset on disk

def find_dataset_dir(data_dir: str, name: Optional[str] = None) -> str:
  """The TFDS version folder (with dataset_info.json): `data_dir` itself, `data_dir/VERSION`, or
  `data_dir/name/VERSION` (latest version)."""
  def versions(d):
    return sorted((v for v in os.listdir(d) if os.path.isfile(os.path.join(d, v, 'dataset_info.json'))),
                  key=lambda v: tuple(int(x) for x in v.split('.') if x.isdigit()))
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f'dataset folder not found: {data_dir}')
  if os.path.isfile(os.path.join(data_dir, 'dataset_info.json')):
    return data_dir
  root = os.path.join(data_dir, name) if name else data_dir
  if os.path.isdir(root) and versions(root):
    return os.path.join(root, versions(root)[-1])
  candidates = [n for n in sorted(os.listdir(data_dir))
                if os.path.isdir(os.path.join(data_dir, n)) and versions(os.path.join(data_dir, n))]
  if name is None and len(candidates) == 1:
    return find_dataset_dir(data_dir, candidates[0])
  raise FileNotFoundError(f'no TFDS dataset{" " + repr(name) if name else ""} under {data_dir}; '
                          f'found {candidates or "none"} (build one with python -m llava_jax.data.build)')


def open_source(data_dir: str, split: str, name: Optional[str] = None):
  """Random-access source of records {'id', 'image_path', 'image', 'conversations'} (bytes values)."""
  import tensorflow_datasets as tfds  # local: keeps worker start-up light
  builder = tfds.builder_from_directory(find_dataset_dir(data_dir, name))
  if split not in builder.info.splits:
    raise ValueError(f'split {split!r} not in {builder.info.full_name}; have {list(builder.info.splits)}')
  return builder.as_data_source(split=split)


def dataset_size(data_dir: str, split: str, name: Optional[str] = None) -> int:
  """Number of records in a split (from the metadata; reads no records)."""
  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(find_dataset_dir(data_dir, name))
  return builder.info.splits[split].num_examples


def steps_per_epoch(num_examples: int, global_batch_size: int, drop_remainder: bool = False) -> int:
  """Global batches per epoch: the last partial batch is padded (kept) unless `drop_remainder`."""
  return num_examples // global_batch_size if drop_remainder else -(-num_examples // global_batch_size)


def load_modality_lengths(data_dir: str, split: str, name: Optional[str] = None) -> np.ndarray:
  path = os.path.join(find_dataset_dir(data_dir, name), LENGTHS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} missing: length grouping needs the build side file; rebuild '
                            f'with python -m llava_jax.data.build')
  with open(path, encoding='utf-8') as f:
    lengths = json.load(f)
  if split not in lengths:
    raise ValueError(f'{path} has no lengths for split {split!r}')
  return np.asarray(lengths[split], np.int64)


# ----------------------------------------------------------------------------- sample order

def _even_chunks(megabatch: Sequence[int], lengths: np.ndarray, num_chunks: int) -> list[int]:
  """Splits a longest-first megabatch into `num_chunks` equal chunks of similar total length
  (greedy: each index to the chunk with the least length that still has room); flattened."""
  if len(megabatch) % num_chunks:
    return [i for c in range(num_chunks) for i in megabatch[c::num_chunks]]
  size = len(megabatch) // num_chunks
  chunks, totals = [[] for _ in range(num_chunks)], [0.0] * num_chunks
  for i in megabatch:
    c = totals.index(min(totals))
    chunks[c].append(i)
    totals[c] = math.inf if len(chunks[c]) == size else totals[c] + lengths[i]
  return [i for chunk in chunks for i in chunk]


def _length_grouped(indices: np.ndarray, lengths: np.ndarray, megabatch: int, num_chunks: int,
                    rng: np.random.Generator) -> list[int]:
  perm = indices[rng.permutation(len(indices))]
  out = []
  for s in range(0, len(perm), megabatch):
    mb = sorted(perm[s:s + megabatch].tolist(), key=lambda i: -lengths[i])
    out += _even_chunks(mb, lengths, num_chunks)
  return out


def modality_grouped_order(lengths: np.ndarray, megabatch: int, num_chunks: int,
                           rng: np.random.Generator) -> np.ndarray:
  """LLaVA-1.5 `group_by_modality_length`: image (length > 0) and text-only (< 0) samples in
  separate megabatches (one global batch each), sorted by length inside, megabatches shuffled; the
  two leftover partial megabatches go last together."""
  lengths = np.asarray(lengths)
  mm, lang = np.flatnonzero(lengths > 0), np.flatnonzero(lengths < 0)
  size = np.abs(lengths)
  if not len(mm) or not len(lang):
    return np.asarray(_length_grouped(np.arange(len(lengths)), size, megabatch, num_chunks, rng), np.int64)
  groups = []
  tail = []
  for idx in (mm, lang):
    order = _length_grouped(idx, size, megabatch, num_chunks, rng)
    mbs = [order[s:s + megabatch] for s in range(0, len(order), megabatch)]
    groups += mbs[:-1]
    tail += mbs[-1]
  groups = [groups[i] for i in rng.permutation(len(groups))]
  return np.asarray([i for mb in groups + [sorted(tail)] for i in mb], np.int64)


def epoch_order(epoch: int, *, num_records: int, global_batch_size: int, process_count: int, seed: int,
                shuffle: bool, lengths: Optional[np.ndarray] = None, drop_remainder: bool = False) -> np.ndarray:
  """Record indices of one epoch, int64[steps * global_batch_size], -1 = padding row."""
  rng = np.random.default_rng([seed, epoch])
  if lengths is not None:
    order = modality_grouped_order(lengths, global_batch_size, process_count, rng)
  elif shuffle:
    order = rng.permutation(num_records)
  else:
    order = np.arange(num_records)
  n = steps_per_epoch(num_records, global_batch_size, drop_remainder) * global_batch_size
  return np.concatenate([order, np.full(max(0, n - len(order)), -1, np.int64)])[:n]


@dataclasses.dataclass
class _PositionToRecord:
  """Position k in this process's stream -> record index (-1: padding row)."""
  num_records: int
  global_batch_size: int
  process_index: int
  process_count: int
  seed: int
  shuffle: bool
  lengths: Optional[np.ndarray]
  drop_remainder: bool

  def __post_init__(self):
    self.batch = self.global_batch_size // self.process_count
    self.steps = steps_per_epoch(self.num_records, self.global_batch_size, self.drop_remainder)
    self._cache = {}

  def order(self, epoch: int) -> np.ndarray:
    order = self._cache.get(epoch)
    if order is None:  # reader threads may race here: both compute the same order
      order = epoch_order(epoch, num_records=self.num_records, global_batch_size=self.global_batch_size,
                          process_count=self.process_count, seed=self.seed, shuffle=self.shuffle,
                          lengths=self.lengths, drop_remainder=self.drop_remainder)
      self._cache = {epoch: order, **{e: o for e, o in self._cache.items() if e == epoch - 1}}
    return order

  def __call__(self, k: int) -> int:
    step, j = divmod(int(k), self.batch)
    epoch, s = divmod(step, self.steps)
    return int(self.order(epoch)[s * self.global_batch_size + self.process_index * self.batch + j])

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_cache'}

  def __setstate__(self, state):
    self.__dict__.update(state, _cache={})


# ----------------------------------------------------------------------------- per-sample work

class _LoadExample(grain.transforms.Map):
  """Record index -> one padded training row (runs in the worker processes)."""

  def __init__(self, source, tokenizer, template, num_image_tokens, image_size, image_aspect, max_length):
    self.source, self.tokenizer, self.template = source, tokenizer, template
    self.num_image_tokens, self.image_size, self.image_aspect = num_image_tokens, image_size, image_aspect
    self.max_length = max_length
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Empty rows attend to one token so no attention row is fully masked.
    self.first_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.pad_id

  def _row(self, index, ids=None, labels=None, pixels=None, **flags):
    n, S = (0 if ids is None else len(ids)), self.max_length
    input_ids = np.full(S, self.pad_id, np.int32)
    row_labels = np.full(S, IGNORE_INDEX, np.int32)
    mask = np.zeros(S, np.int32)
    if n:
      input_ids[:n], row_labels[:n], mask[:n] = ids, labels, 1
    else:
      input_ids[0], mask[0] = self.first_id, 1
    row = dict(input_ids=input_ids, labels=row_labels, attention_mask=mask,
               pixel_values=blank_image(self.image_size) if pixels is None else pixels,
               has_image=np.bool_(pixels is not None), index=np.int32(index))
    row['flags'] = np.asarray([flags.get(k, False) for k in _STAT_KEYS], np.bool_)  # one array: less IPC
    return row

  def map(self, index: int) -> dict:
    if index < 0:
      return self._row(index, padding_row=True)
    record = self.source[index]
    try:
      conversations = json.loads(record['conversations'])
      tok = tokenize_conversation(conversations, self.tokenizer, self.template, self.num_image_tokens,
                                  self.max_length)
    except ValueError:  # the builder checked the turns; a record could only get here if edited
      return self._row(index, dropped=True)
    if tok['dropped']:
      return self._row(index, dropped=True, truncated=tok['truncated'])
    pixels = None
    if tok['has_image']:
      try:
        pixels = preprocess_image(load_image(record['image']), self.image_size, self.image_aspect)
      except (OSError, ValueError):
        return self._row(index, dropped=True)
    return self._row(index, tok['input_ids'], tok['labels'], pixels, truncated=tok['truncated'])


def _collate(rows: Sequence[dict]) -> dict:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ----------------------------------------------------------------------------- iterator

@dataclasses.dataclass
class _Streams:
  """Builds the iterator over this process's batches from batch `start` on (in workers or not)."""
  batches: grain.MapDataset
  read_options: grain.ReadOptions
  worker_count: int
  worker_buffer: int

  def __call__(self, start: int):
    ds = self.batches.slice(slice(start, None)).to_iter_dataset(self.read_options)
    if self.worker_count:
      from absl import flags  # grain's worker start-up reads absl flags: use defaults if none parsed
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                       per_worker_buffer_size=self.worker_buffer))
    return iter(ds)


class LlavaIterator(grain.DatasetIterator):
  """Yields {'input_ids', 'labels', 'attention_mask': int32 [b, S], 'pixel_values': float32
  [b, H, W, 3], 'has_image': bool [b]} (+ 'index' int32 [b] record ids, -1 padding, with
  `with_index`).

  State = number of batches consumed (+ stats), JSON-serializable for grain/orbax checkpointing.
  Batches are a pure function of their position, so a state restores to the same following batches
  with any worker count.

  Attributes: num_records, steps_per_epoch, examples_per_epoch (= steps * global batch, including
  padding rows), num_steps (None when epochs are unbounded), batch_size (per process).
  """

  def __init__(self, streams: _Streams, *, with_index: bool, **info):
    self._streams, self._with_index = streams, with_index
    self._inner = streams(0)
    super().__init__(self._inner)
    for k, v in info.items():
      setattr(self, k, v)
    self._next_batch = 0
    self._stats = dict(batches=0, rows=0, tokens=0, pad_tokens=0, truncated=0, dropped=0, padding_rows=0)

  def __next__(self) -> dict:
    batch = next(self._inner)
    self._next_batch += 1
    s = self._stats
    s['batches'] += 1
    s['rows'] += len(batch['input_ids'])
    s['tokens'] += batch['attention_mask'].size
    s['pad_tokens'] += int(batch['attention_mask'].size - batch['attention_mask'].sum())
    truncated, dropped, padding = batch['flags'].sum(0).tolist()
    s['truncated'] += truncated
    s['dropped'] += dropped
    s['padding_rows'] += padding
    keys = BATCH_KEYS + (('index',) if self._with_index else ())
    return {k: batch[k] for k in keys}

  def stats(self) -> dict:
    """Counts since the start (kept across get/set_state): rows, truncated, dropped (empty rows
    standing in for samples that could not fit), padding_rows, and padding waste
    pad_fraction = pad tokens / all token slots."""
    s = dict(self._stats)
    s['pad_fraction'] = s['pad_tokens'] / s['tokens'] if s['tokens'] else 0.0
    return s

  def get_state(self) -> dict:
    return {'next_batch': self._next_batch, 'stats': dict(self._stats)}

  def set_state(self, state: dict) -> None:
    self.close()
    self._next_batch = int(state['next_batch'])
    self._inner = self._streams(self._next_batch)
    self._stats = dict(state['stats'])

  def close(self) -> None:
    close = getattr(self._inner, 'close', None)
    if close is not None:
      close()


def make_pipeline(data_dir: str, *, split: str, tokenizer, template: str, num_image_tokens: int,
                  image_size: int, image_aspect: str, max_length: int, global_batch_size: int, seed: int,
                  num_epochs: Optional[int], shuffle: bool = True, group_by_length: bool = False,
                  worker_count: int = 0, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, name: Optional[str] = None,
                  drop_remainder: bool = False, with_index: bool = False, read_threads: int = 2,
                  prefetch_batches: int = 2) -> LlavaIterator:
  """Training batches for this process; see the module docstring. `num_epochs=None` repeats forever.

  `tokenizer` must already have the `<image>` token (add_image_token). `group_by_length` needs the
  build's modality_lengths.json and always shuffles (megabatches are drawn at random). `read_threads`/`prefetch_batches` are per process (main or worker).
  """
  get_template(template)
  if image_aspect not in ASPECTS:
    raise ValueError(f'image_aspect must be one of {ASPECTS}, got {image_aspect!r}')
  image_token_id(tokenizer)
  if process_index is None or process_count is None:
    import jax  # local: the data package itself never needs jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible by {process_count} processes')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} outside [0, {process_count})')
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs must be >= 1 or None, got {num_epochs}')
  source = open_source(data_dir, split, name)
  num_records = len(source)
  lengths = load_modality_lengths(data_dir, split, name) if group_by_length else None
  if lengths is not None and len(lengths) != num_records:
    raise ValueError(f'modality lengths ({len(lengths)}) do not match the {num_records} records of {split!r}')
  to_record = _PositionToRecord(num_records, global_batch_size, process_index, process_count, seed,
                                shuffle, lengths, drop_remainder)
  batch = global_batch_size // process_count
  steps = to_record.steps
  if steps < 1:
    raise ValueError(f'{num_records} records give no full batch of {global_batch_size} with drop_remainder')
  num_positions = steps * batch * num_epochs if num_epochs else (sys.maxsize // batch) * batch
  ds = (grain.MapDataset.range(num_positions)
        .map(to_record)
        .map(_LoadExample(source, tokenizer, template, num_image_tokens, image_size, image_aspect, max_length))
        .batch(batch, drop_remainder=True, batch_fn=_collate))
  streams = _Streams(ds, grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches),
                     worker_count, prefetch_batches)
  return LlavaIterator(streams, with_index=with_index, num_records=num_records, steps_per_epoch=steps,
                       examples_per_epoch=steps * global_batch_size, batch_size=batch,
                       num_steps=steps * num_epochs if num_epochs else None)
