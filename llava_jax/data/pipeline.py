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

Packing (`packing=True`): a row of `row_length` tokens (default `max_length`, which still cuts each
sample) holds several samples back to back, with
`segment_ids` (1..n, 0 = padding) and `positions` restarting at 0 per sample, and up to
`max_images_per_row` images in slots (image j of a row fills its j-th run of image tokens). Then
`global_batch_size` counts ROWS per update: samples per update = rows x samples per row (`stats()`).
The rows of an epoch are planned once, globally, from (seed, epoch) and the exact token length of
every sample (tokenized once, cached in the dataset folder's token_lengths/): the epoch's order as
above, then first-fit into the open rows, closing the fullest when none fits (`pack_rows`). The global
batches are those rows in order, the last completed with empty rows (no sample is repeated), so
per-process slices, worker counts and mid-epoch restore behave exactly as without packing. Truncation
and drops follow the same rules (a dropped sample takes no room and is counted). grain's FirstFitPackIterDataset (0.2.18) packs
each process's stream online; it is not used because rows would then depend on the process count and
on buffering (an unknown number of steps per epoch, samples of two epochs in one row).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from typing import Optional, Sequence, Union

import grain
import numpy as np

from llava_jax.data.builder import LENGTHS_FILE
from llava_jax.data.conversation import get_template
from llava_jax.data.image import ASPECTS, blank_image, load_image, preprocess_image
from llava_jax.data.tokenize import IGNORE_INDEX, ImageTokens, require_image_tokens, tokenize_conversation

BATCH_KEYS = ('input_ids', 'labels', 'attention_mask', 'pixel_values', 'has_image')
PACKED_BATCH_KEYS = ('input_ids', 'labels', 'segment_ids', 'positions', 'attention_mask', 'pixel_values',
                     'image_valid')
_STAT_KEYS = ('truncated', 'dropped', 'padding_row', 'samples')
PACKING_BINS = 64  # open rows first-fit packing chooses among (grain's num_packing_bins)
TOKEN_LENGTHS_DIR = 'token_lengths'


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


def sample_order(epoch: int, *, num_records: int, global_batch_size: int, process_count: int, seed: int,
                 shuffle: bool, lengths: Optional[np.ndarray] = None) -> np.ndarray:
  """Every record index once, int64[num_records], in the order of epoch `epoch` (from (seed, epoch))."""
  rng = np.random.default_rng([seed, epoch])
  if lengths is not None:
    return modality_grouped_order(lengths, global_batch_size, process_count, rng)
  return rng.permutation(num_records) if shuffle else np.arange(num_records)


def epoch_order(epoch: int, *, num_records: int, global_batch_size: int, process_count: int, seed: int,
                shuffle: bool, lengths: Optional[np.ndarray] = None, drop_remainder: bool = False) -> np.ndarray:
  """Record indices of one epoch, int64[steps * global_batch_size], -1 = padding row."""
  order = sample_order(epoch, num_records=num_records, global_batch_size=global_batch_size,
                       process_count=process_count, seed=seed, shuffle=shuffle, lengths=lengths)
  n = steps_per_epoch(num_records, global_batch_size, drop_remainder) * global_batch_size
  return np.concatenate([order, np.full(max(0, n - len(order)), -1, np.int64)])[:n]


@dataclasses.dataclass
class _EpochPlan:
  """What decides the epochs' sample order; pickles without its per-epoch cache (workers recompute
  what they need)."""
  global_batch_size: int
  process_index: int
  process_count: int
  seed: int
  shuffle: bool
  lengths: Optional[np.ndarray]  # modality lengths: LLaVA-1.5 grouping; None: plain shuffle

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_cache'}

  def __setstate__(self, state):
    self.__dict__.update(state, _cache={})


@dataclasses.dataclass
class _PositionToRecord(_EpochPlan):
  """Position k in this process's stream -> record index (-1: padding row)."""
  num_records: int
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


# ----------------------------------------------------------------------------- packing plan

def record_images(record) -> list[bytes]:
  """The encoded images of a record, in `<image>` order: builds 1.1.0+ store a list, 1.0.0 one bytes value."""
  images = record['image']
  if isinstance(images, bytes):
    return [images] if images else []
  return [bytes(x) for x in images]


def _record_id(record, index: int) -> str:
  rid = record['id']
  return f'{rid.decode() if isinstance(rid, bytes) else rid!r} (record {index})'


def _tokenizer_fingerprint(tokenizer) -> str:
  backend = getattr(tokenizer, 'backend_tokenizer', None)
  text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
  return f'{type(tokenizer).__name__} {tokenizer.bos_token_id} {tokenizer.eos_token!r} {text}'


def sample_lengths(source, tokenize, *, cache_path: Optional[str] = None,
                   progress_every: int = 20000) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32[N], images int32[N]) of every record as the pipeline will load it: tokens after
  truncation, 0 for a sample that is dropped. Packing plans rows from these exact counts (the build's
  word counts are only estimates). Read once and cached at `cache_path` (.npz) when given."""
  if cache_path and os.path.isfile(cache_path):
    with np.load(cache_path) as f:
      if len(f['tokens']) == len(source):
        return f['tokens'], f['images']
  n = len(source)
  tokens, images = np.zeros(n, np.int32), np.zeros(n, np.int32)
  for i in range(n):
    tok = tokenize(source[i], i)
    if tok is not None and not tok['dropped']:
      tokens[i], images[i] = len(tok['input_ids']), tok['num_images']
    if progress_every and n >= progress_every and ((i + 1) % progress_every == 0 or i + 1 == n):
      print(f'[packing] token lengths of {i + 1}/{n} records', flush=True)
  if cache_path:
    try:  # cache beside the dataset; a read-only dataset folder just recomputes next time
      os.makedirs(os.path.dirname(cache_path), exist_ok=True)
      tmp = f'{cache_path}.{os.getpid()}.tmp.npz'
      np.savez(tmp, tokens=tokens, images=images)
      os.replace(tmp, cache_path)
    except OSError:
      pass
  return tokens, images


def pack_rows(order: np.ndarray, tokens: np.ndarray, images: np.ndarray, *, row_length: int,
              max_images: int, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
  """First-fit packing of `order` into rows of `row_length` tokens and at most `max_images` images.

  Each sample goes to the first of the `num_bins` open rows where it fits; when none has room the
  fullest open row (least room left; the oldest of equals) is closed and a new one opened. Closing
  the fullest rather than the oldest keeps half-empty rows open for later short samples (mix665k-like
  rows of 5120 x 6: 4.9% padding against 5.2%). Rows come out in the order they were closed (the
  still open ones last, in opening order), so a row holds samples from a window of the order.
  Samples with 0 tokens (dropped) take no room and join the first open row, where the loader counts
  them. Returns (record ids int64[n], row starts int64[rows + 1]): row r = ids[starts[r]:starts[r + 1]].
  """
  closed, bins, room, slots = [], [], [], []
  for i in order.tolist():
    n, k = int(tokens[i]), int(images[i])
    for j in range(len(bins)):
      if room[j] >= n and slots[j] >= k:
        bins[j].append(i)
        room[j] -= n
        slots[j] -= k
        break
    else:
      if len(bins) == num_bins:
        j = room.index(min(room))
        closed.append(bins.pop(j))
        room.pop(j)
        slots.pop(j)
      bins.append([i])
      room.append(row_length - n)
      slots.append(max_images - k)
  rows = closed + bins
  starts = np.cumsum([0] + [len(r) for r in rows])
  return np.asarray([i for r in rows for i in r], np.int64), starts.astype(np.int64)


@dataclasses.dataclass
class _PositionToRow(_EpochPlan):
  """Packing: position k in this process's stream -> record ids of one row (empty: padding row).

  Every epoch's rows are planned globally from (seed, epoch) and the exact sample lengths, so all
  processes and workers agree on them; global batch g of an epoch = rows [g*G, (g+1)*G), the last
  one completed with empty rows. Epochs may differ in their number of rows (and steps).
  """
  tokens: np.ndarray
  images: np.ndarray
  row_length: int
  max_images: int
  num_bins: int

  def __post_init__(self):
    self.batch = self.global_batch_size // self.process_count
    self.epoch_steps = []  # steps of epochs 0, 1, ... as far as planned (small; kept when pickled)
    self._cache = {}

  def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    plan = self._cache.get(epoch)
    if plan is None:  # reader threads may race here: both compute the same plan
      order = sample_order(epoch, num_records=len(self.tokens), global_batch_size=self.global_batch_size,
                           process_count=self.process_count, seed=self.seed, shuffle=self.shuffle,
                           lengths=self.lengths)
      plan = pack_rows(order, self.tokens, self.images, row_length=self.row_length, max_images=self.max_images,
                       num_bins=self.num_bins)
      self._cache = {epoch: plan, **{e: p for e, p in self._cache.items() if e == epoch - 1}}
    return plan

  def steps(self, epoch: int) -> int:
    while len(self.epoch_steps) <= epoch:
      self.epoch_steps.append(-(-(len(self.plan(len(self.epoch_steps))[1]) - 1) // self.global_batch_size))
    return self.epoch_steps[epoch]

  def __call__(self, k: int) -> np.ndarray:
    step, j = divmod(int(k), self.batch)
    epoch = 0
    while step >= self.steps(epoch):
      step -= self.steps(epoch)
      epoch += 1
    ids, starts = self.plan(epoch)
    r = step * self.global_batch_size + self.process_index * self.batch + j
    return ids[starts[r]:starts[r + 1]] if r + 1 < len(starts) else ids[:0]


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

  def tokenize(self, record, index: int) -> Optional[dict]:
    """The record's tokens (tokenize_conversation) or None when its turns do not parse. A record whose
    `<image>` count differs from its images is an error naming it: never a silent shift of images."""
    try:
      tok = tokenize_conversation(json.loads(record['conversations']), self.tokenizer, self.template,
                                  self.num_image_tokens, self.max_length)
    except ValueError:  # the builder checked the turns; a record could only get here if edited
      return None
    num_images = len(record_images(record))
    if tok['num_images'] != num_images:
      raise ValueError(f'sample {_record_id(record, index)} has {tok["num_images"]} <image> placeholders but '
                       f'{num_images} images; rebuild the dataset with python -m llava_jax.data.build, which '
                       'skips and counts such samples')
    return tok

  def sample(self, index: int) -> tuple[Optional[dict], list, dict]:
    """(tokens or None if dropped, preprocessed images, stat flags) of record `index`."""
    record = self.source[index]
    tok = self.tokenize(record, index)
    if tok is None:
      return None, [], dict(dropped=True)
    if tok['dropped']:
      return None, [], dict(dropped=True, truncated=tok['truncated'])
    try:
      pixels = [preprocess_image(load_image(data), self.image_size, self.image_aspect)
                for data in record_images(record)]
    except (OSError, ValueError):
      return None, [], dict(dropped=True)
    return tok, pixels, dict(truncated=tok['truncated'], samples=True)

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
    row['flags'] = np.asarray([flags.get(k, False) for k in _STAT_KEYS], np.int32)  # one array: less IPC
    return row

  def map(self, index: int) -> dict:
    if index < 0:
      return self._row(index, padding_row=True)
    tok, pixels, flags = self.sample(index)
    if tok is None:
      return self._row(index, **flags)
    if len(pixels) > 1:
      raise ValueError(f'sample {_record_id(self.source[index], index)} has {len(pixels)} images: several images '
                       'per sample need packed rows (data.packing=True)')
    return self._row(index, tok['input_ids'], tok['labels'], pixels[0] if pixels else None, **flags)


class _LoadRow(_LoadExample):
  """Record ids of one planned row -> one packed row: samples back to back, `segment_ids` 1..n (0 =
  padding), `positions` restarting at 0 per sample, the first label of each sample ignored (no
  prediction across samples), image j of the row in slot j (= the j-th run of image tokens)."""

  def __init__(self, *args, row_length: int, max_images: int, max_segments: int):
    super().__init__(*args)
    self.row_length, self.max_images, self.max_segments = row_length, max_images, max_segments

  def map(self, ids: np.ndarray) -> dict:
    S, K = self.row_length, self.max_images
    input_ids = np.full(S, self.pad_id, np.int32)
    labels = np.full(S, IGNORE_INDEX, np.int32)
    segment_ids, positions = np.zeros(S, np.int32), np.zeros(S, np.int32)
    pixel_values = np.zeros((K, self.image_size, self.image_size, 3), np.float32)
    image_valid = np.zeros(K, np.bool_)
    index = np.full(self.max_segments, -1, np.int32)
    counts = dict.fromkeys(_STAT_KEYS, 0)
    counts['padding_row'] = int(not len(ids))
    at = slot = seg = 0
    for i in ids.tolist():
      tok, pixels, flags = self.sample(i)
      for k, v in flags.items():
        counts[k] += int(v)
      if tok is None:
        continue
      n, m = len(tok['input_ids']), len(pixels)
      if at + n > S or slot + m > K or seg == self.max_segments:
        raise RuntimeError(f'sample {_record_id(self.source[i], i)} does not fit its planned row ({n} tokens, {m} '
                           f'images at {at}/{S}, {slot}/{K}): the token-length cache is stale; delete it and rerun')
      input_ids[at:at + n], labels[at:at + n] = tok['input_ids'], tok['labels']
      labels[at] = IGNORE_INDEX
      segment_ids[at:at + n], positions[at:at + n] = seg + 1, np.arange(n)
      if m:
        pixel_values[slot:slot + m], image_valid[slot:slot + m] = pixels, True
      index[seg] = i
      at, slot, seg = at + n, slot + m, seg + 1
    return dict(input_ids=input_ids, labels=labels, segment_ids=segment_ids, positions=positions,
                attention_mask=(segment_ids > 0).astype(np.int32), pixel_values=pixel_values,
                image_valid=image_valid, index=index,
                flags=np.asarray([counts[k] for k in _STAT_KEYS], np.int32))


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
  `with_index`). Packed: {'input_ids', 'labels', 'segment_ids', 'positions', 'attention_mask' (=
  segment_ids > 0): int32 [b, S], 'pixel_values': float32 [b, K, H, W, 3], 'image_valid': bool [b, K]}
  (+ 'index' int32 [b, max_segments]: the record of segment j + 1, -1 after the last).

  State = number of batches consumed (+ stats), JSON-serializable for grain/orbax checkpointing.
  Batches are a pure function of their position, so a state restores to the same following batches
  with any worker count.

  Attributes: num_records, steps_per_epoch, examples_per_epoch (= steps * global batch, including
  padding rows), num_steps (None when epochs are unbounded), batch_size (per process).
  """

  def __init__(self, streams: _Streams, *, with_index: bool, packing: bool, **info):
    self._streams, self._with_index, self.packing = streams, with_index, packing
    self._keys = (PACKED_BATCH_KEYS if packing else BATCH_KEYS) + (('index',) if with_index else ())
    self._inner = streams(0)
    super().__init__(self._inner)
    for k, v in info.items():
      setattr(self, k, v)
    self._next_batch = 0
    self._stats = dict(batches=0, rows=0, tokens=0, pad_tokens=0, truncated=0, dropped=0, padding_rows=0,
                       samples=0, images=0, image_slots=0)

  def __next__(self) -> dict:
    batch = next(self._inner)
    self._next_batch += 1
    s = self._stats
    s['batches'] += 1
    s['rows'] += len(batch['input_ids'])
    s['tokens'] += batch['attention_mask'].size
    s['pad_tokens'] += int(batch['attention_mask'].size - batch['attention_mask'].sum())
    for k, v in zip(_STAT_KEYS, batch['flags'].sum(0).tolist()):
      s['padding_rows' if k == 'padding_row' else k] += v
    valid = batch['image_valid'] if self.packing else batch['has_image']
    s['images'] += int(valid.sum())
    s['image_slots'] += valid.size
    return {k: batch[k] for k in self._keys}

  def stats(self) -> dict:
    """Counts since the start (kept across get/set_state): rows, samples, truncated, dropped (samples
    that could not fit: empty rows unpacked, left out packed), padding_rows, images, image_slots; and
    the padding waste: pad_fraction = pad tokens / all token slots, image_pad_fraction = unused image
    slots / slots (each costs a vision-tower pass), samples_per_row."""
    s = dict(self._stats)
    s['pad_fraction'] = s['pad_tokens'] / s['tokens'] if s['tokens'] else 0.0
    s['image_pad_fraction'] = 1 - s['images'] / s['image_slots'] if s['image_slots'] else 0.0
    s['samples_per_row'] = s['samples'] / s['rows'] if s['rows'] else 0.0
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


def make_pipeline(data_dir: str, *, split: str, tokenizer, template: str,
                  num_image_tokens: Union[int, ImageTokens], image_size: int, image_aspect: str, max_length: int,
                  global_batch_size: int, seed: int,
                  num_epochs: Optional[int], shuffle: bool = True, group_by_length: bool = False,
                  packing: bool = False, row_length: Optional[int] = None, max_images_per_row: int = 1,
                  worker_count: int = 0,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  name: Optional[str] = None, drop_remainder: bool = False, with_index: bool = False,
                  read_threads: int = 2, prefetch_batches: int = 2,
                  packing_bins: int = PACKING_BINS) -> LlavaIterator:
  """Training batches for this process; see the module docstring. `num_epochs=None` repeats forever.

  `tokenizer` must already have the `<image>` token (add_image_token), or the tokens of the ImageTokens layout
  passed as `num_image_tokens`. `group_by_length` needs the build's modality_lengths.json and always shuffles
  (megabatches are drawn at random). `read_threads`/`prefetch_batches` are per process (main or worker).
  `packing`: rows of `row_length` tokens (None: `max_length`, the cut of each sample) hold several
  samples and up to `max_images_per_row` images;
  `global_batch_size` then counts rows, not samples (see the module docstring).
  """
  get_template(template)
  if image_aspect not in ASPECTS:
    raise ValueError(f'image_aspect must be one of {ASPECTS}, got {image_aspect!r}')
  require_image_tokens(tokenizer, num_image_tokens)
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
  row_length = max_length if row_length is None else row_length
  if packing and (max_images_per_row < 1 or packing_bins < 1 or drop_remainder or row_length < max_length):
    raise ValueError(f'packing needs max_images_per_row >= 1 (got {max_images_per_row}), packing_bins >= 1 (got '
                     f'{packing_bins}), row_length >= max_length (got {row_length} < {max_length}) and no '
                     'drop_remainder')
  source = open_source(data_dir, split, name)
  num_records = len(source)
  lengths = load_modality_lengths(data_dir, split, name) if group_by_length else None
  if lengths is not None and len(lengths) != num_records:
    raise ValueError(f'modality lengths ({len(lengths)}) do not match the {num_records} records of {split!r}')
  batch = global_batch_size // process_count
  load_args = (source, tokenizer, template, num_image_tokens, image_size, image_aspect, max_length)
  plan_args = (global_batch_size, process_index, process_count, seed, shuffle, lengths)
  if packing:
    tokens, images = packed_lengths(data_dir, split, name, source, *load_args[1:])
    too_many = np.flatnonzero(images > max_images_per_row)
    if len(too_many):
      raise ValueError(f'{len(too_many)} samples have more images than data.max_images_per_row='
                       f'{max_images_per_row} (e.g. {_record_id(source[int(too_many[0])], int(too_many[0]))} with '
                       f'{images[too_many[0]]}); raise it')
    to_item = _PositionToRow(*plan_args, tokens, images, row_length, max_images_per_row, packing_bins)
    shortest = int(tokens[tokens > 0].min()) if (tokens > 0).any() else row_length
    load = _LoadRow(*load_args, row_length=row_length, max_images=max_images_per_row,
                    max_segments=max(1, row_length // shortest))
    steps = to_item.steps(0)
    epoch_steps = [to_item.steps(e) for e in range(num_epochs)] if num_epochs else None
    samples_per_epoch = int((tokens > 0).sum())
  else:
    to_item = _PositionToRecord(*plan_args, num_records, drop_remainder)
    load = _LoadExample(*load_args)
    steps = to_item.steps
    epoch_steps = [steps] * num_epochs if num_epochs else None
    samples_per_epoch = num_records
  if steps < 1:
    raise ValueError(f'{num_records} records give no full batch of {global_batch_size} with drop_remainder')
  num_positions = sum(epoch_steps) * batch if num_epochs else (sys.maxsize // batch) * batch
  ds = (grain.MapDataset.range(num_positions)
        .map(to_item)
        .map(load)
        .batch(batch, drop_remainder=True, batch_fn=_collate))
  streams = _Streams(ds, grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches),
                     worker_count, prefetch_batches)
  return LlavaIterator(streams, with_index=with_index, packing=packing, num_records=num_records,
                       steps_per_epoch=steps, examples_per_epoch=steps * global_batch_size, batch_size=batch,
                       samples_per_epoch=samples_per_epoch,
                       num_steps=sum(epoch_steps) if num_epochs else None)


def packed_lengths(data_dir: str, split: str, name: Optional[str], source, tokenizer, template: str,
                   num_image_tokens: int, image_size: int, image_aspect: str,
                   max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """`sample_lengths` of a split, cached in the dataset folder (token_lengths/) under a key of
  everything that changes them (tokenizer, template, image tokens, max_length)."""
  del image_size, image_aspect  # do not change lengths
  key = hashlib.sha256('\0'.join(map(str, (_tokenizer_fingerprint(tokenizer), template, num_image_tokens,
                                             max_length, len(source)))).encode()).hexdigest()[:16]
  path = os.path.join(find_dataset_dir(data_dir, name), TOKEN_LENGTHS_DIR, f'{split}-{key}.npz')
  load = _LoadExample(source, tokenizer, template, num_image_tokens, 1, 'square', max_length)
  return sample_lengths(source, load.tokenize, cache_path=path)
