"""TFDS builder: LLaVA JSON + image folder -> ArrayRecord shards with the encoded image bytes.

No TensorFlow is needed: features are plain bytes/text serialized by tfds.features, written with the
array_record file format and read back with `tfds.data_source` / `tfds.builder_from_directory`.

Each record: `id` (text), `image_path` and `image` (lists: each image's relative path and its file's
encoded bytes, in `<image>` order; empty for text-only) and `conversations` (the LLaVA turns as JSON
text). The JSON "image" is one path or, for several images, a list of paths. (Version 1.0.0 stored one
path and one bytes value; the pipeline reads both.) Records keep the order of the
JSON file (write-time shuffling is off; the grain pipeline shuffles), so the side files below line up
with record indices.

Bad entries are skipped, never fatal: `malformed`, `image_token_count`, `no_gpt_turn`,
`missing_image`, `undecodable_image`. Next to the shards the build writes
`build_report.json` (counts per reason, and every skipped index/id/reason) and
`modality_lengths.json` (per split, LLaVA-1.5's signed word counts: + image, - text-only) used by
length grouping.
"""
from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import os
import re
import shutil
import tempfile
import threading
from typing import Iterator, Mapping, Optional

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from llava_jax.data.conversation import ASSISTANT, IMAGE_TOKEN, normalize_turns

REPORT_FILE = 'build_report.json'
LENGTHS_FILE = 'modality_lengths.json'
SKIP_REASONS = ('malformed', 'image_token_count', 'no_gpt_turn', 'missing_image', 'undecodable_image')


class SkipRecord(Exception):
  def __init__(self, reason: str, detail: str):
    super().__init__(f'{reason}: {detail}')
    self.reason, self.detail = reason, detail


def read_entries(path: str) -> list[tuple[int, object]]:
  """[(index, entry)] from a LLaVA JSON list or a JSONL file. A JSONL line that does not parse
  becomes an entry of type SkipRecord (reported, not fatal); a JSON list that does not parse is a
  fatal error naming the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'data file not found: {path}')
  with open(path, encoding='utf-8') as f:
    if path.endswith('.jsonl'):
      entries = []
      for i, line in enumerate(f):
        if line.strip():
          try:
            entries.append((i, json.loads(line)))
          except json.JSONDecodeError as e:
            entries.append((i, SkipRecord('malformed', f'line {i + 1}: invalid JSON ({e})')))
      return entries
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e}); expected a list of LLaVA samples') from None
  if not isinstance(data, list):
    raise ValueError(f'{path}: top level is {type(data).__name__}; expected a list of LLaVA samples')
  return list(enumerate(data))


def modality_length(conversations: list, has_image: bool) -> int:
  """Words in all turns (at least 1), positive with an image, negative without (LLaVA-1.5)."""
  n = max(1, sum(len(t['value'].split()) for t in conversations))
  return n if has_image else -n


class _ImageChecker:
  """Reads an image file and proves it decodes; results cached by path (images are shared)."""

  def __init__(self, image_dir: str):
    self.image_dir = image_dir
    self._ok = {}
    self._lock = threading.Lock()

  def __call__(self, rel_path: str) -> bytes:
    path = os.path.join(self.image_dir, rel_path)
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except OSError as e:
      raise SkipRecord('missing_image', f'{path}: {e.strerror or e}') from None
    with self._lock:
      known = self._ok.get(path)
    if known is None:
      known = ''
      try:
        with Image.open(io.BytesIO(data)) as img:
          img.draft('RGB', (1, 1))  # JPEG: decode at 1/8 scale; still reads every byte of the stream
          img.load()
          if min(img.size) < 1:
            known = f'{path}: empty image {img.size}'
      except Exception as e:  # PIL raises many types for corrupt files
        known = f'{path}: {type(e).__name__}: {str(e).split(" <_io.")[0]}'
      with self._lock:
        self._ok[path] = known
    if known:
      raise SkipRecord('undecodable_image', known)
    return data


def image_paths(entry: dict) -> list[str]:
  """The entry's "image" as a list of paths: one path, a list of them, or none (text-only)."""
  image = entry.get('image')
  paths = [image] if isinstance(image, str) else image if isinstance(image, list) else [] if image is None else None
  if paths is None or not all(isinstance(p, str) and p for p in paths):
    raise SkipRecord('malformed', f'"image" must be a non-empty relative path or a list of them, got {image!r:.80}')
  return paths


def check_entry(entry, check_image: _ImageChecker) -> tuple[dict, int]:
  """One LLaVA JSON entry -> (record features, modality length); raises SkipRecord."""
  if isinstance(entry, SkipRecord):
    raise entry
  if not isinstance(entry, dict):
    raise SkipRecord('malformed', f'entry is {type(entry).__name__}, not an object')
  if not isinstance(entry.get('id'), (str, int)) or isinstance(entry.get('id'), bool):
    raise SkipRecord('malformed', f'missing or non-string "id": {entry.get("id")!r:.80}')
  paths = image_paths(entry)
  conversations = entry.get('conversations')
  if not isinstance(conversations, list) or not all(
      isinstance(t, dict) and isinstance(t.get('value'), str) for t in conversations):
    raise SkipRecord('malformed', '"conversations" must be a list of {"from", "value": str} turns')
  count = sum(t['value'].count(IMAGE_TOKEN) for t in conversations)
  if count != len(paths):  # never a silent shift of images onto the wrong placeholders
    raise SkipRecord('image_token_count', f'{count} {IMAGE_TOKEN} placeholders for {len(paths)} image(s)')
  try:
    turns, _ = normalize_turns(conversations)
  except ValueError as e:
    raise SkipRecord('malformed', str(e)) from None
  if not any(role == ASSISTANT for role, _ in turns):
    raise SkipRecord('no_gpt_turn', 'no assistant ("gpt") turn to learn from')
  record = dict(id=str(entry['id']), image_path=paths, image=[check_image(p) for p in paths],
                conversations=json.dumps(conversations, ensure_ascii=False))
  return record, modality_length(conversations, bool(paths))


class LlavaInstruct(tfds.core.GeneratorBasedBuilder):
  """LLaVA JSON (+ image folder) -> ArrayRecord. `json_files` maps split name -> JSON/JSONL path."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'LLaVA JSON with encoded image bytes.',
                   '1.1.0': 'Several images per sample: image_path and image are lists.'}

  def __init__(self, *, json_files: Optional[Mapping[str, str]] = None, image_dir: str = '',
               num_threads: Optional[int] = None, progress_every: int = 10000, **kwargs):
    self._json_files = dict(json_files or {})
    self._image_dir = image_dir
    self._num_threads = num_threads or min(8, os.cpu_count() or 1)
    self._progress_every = progress_every
    self.reports = {}   # split -> report dict, filled while generating
    self.lengths = {}   # split -> [signed word counts] in record order
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # No url checksums file to find: nothing is downloaded. (tfds' own lookup of this path needs
    # importlib_resources, which a TF-free install lacks.)
    return None

  # tfds announces "Downloading and preparing dataset Unknown size ..." before a build and "... downloaded and
  # prepared" after it, on stdout, whatever the source. Nothing is downloaded here: the `[build split]` lines and
  # build_report.json say what was written. Its warnings (absl logging) are untouched.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='LLaVA-format multimodal conversations with encoded images.',
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'image_path': tfds.features.Sequence(tfds.features.Text()),
            'image': tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            'conversations': tfds.features.Text(),
        }),
        disable_shuffling=True,  # keep JSON order so side files index records
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, path) for split, path in self._json_files.items()}

  def _generate_examples(self, split: str, path: str) -> Iterator[tuple[int, dict]]:
    entries = read_entries(path)
    check_image = _ImageChecker(self._image_dir)
    report = dict(json=path, num_entries=len(entries), num_written=0, num_skipped=0,
                  skipped_by_reason=collections.Counter(), skipped=[])
    self.reports[split], self.lengths[split] = report, []
    chunk = 64 * self._num_threads

    def check(item):
      index, entry = item
      try:
        return index, entry, check_entry(entry, check_image), None
      except SkipRecord as e:
        return index, entry, None, e
      except Exception as e:  # never crash hours in: anything unexpected is a malformed entry
        return index, entry, None, SkipRecord('malformed', f'{type(e).__name__}: {e}')

    with concurrent.futures.ThreadPoolExecutor(self._num_threads) as pool:
      for start in range(0, len(entries), chunk):
        for index, entry, ok, skip in pool.map(check, entries[start:start + chunk]):
          if skip is not None:
            sample_id = entry.get('id') if isinstance(entry, dict) else None
            report['skipped'].append(dict(index=index, id=None if sample_id is None else str(sample_id),
                                          reason=skip.reason, detail=skip.detail))
            report['skipped_by_reason'][skip.reason] += 1
            report['num_skipped'] += 1
            continue
          record, length = ok
          report['num_written'] += 1
          self.lengths[split].append(length)
          yield index, record
        done = min(start + chunk, len(entries))
        if self._progress_every and (done // self._progress_every > start // self._progress_every
                                     or done == len(entries)):
          print(f'[build {split}] {done}/{len(entries)} entries checked, {report["num_written"]} written, '
                f'{report["num_skipped"]} skipped', flush=True)
    if not report['num_written']:
      raise ValueError(f'{path}: no valid sample among {len(entries)} entries; reasons '
                       f'{dict(report["skipped_by_reason"])}, e.g. {report["skipped"][:3]}')


_NAME_RE = re.compile(r'^[a-z][a-z0-9_]*$')


def builder_class(name: str) -> type:
  """LlavaInstruct under another dataset name (one class per name, not registered globally)."""
  if not _NAME_RE.match(name):
    raise ValueError(f'dataset name must be snake_case ([a-z][a-z0-9_]*), got {name!r}')
  if name == LlavaInstruct.name:
    return LlavaInstruct
  return type(f'LlavaJson_{name}', (LlavaInstruct,), {'name': name, '__module__': __name__},
              skip_registration=True)


def build_dataset(json_files: Mapping[str, str], image_dir: str, out_dir: str, *,
                  name: str = 'llava_instruct', overwrite: bool = False,
                  num_threads: Optional[int] = None, progress_every: int = 10000) -> dict:
  """Builds `out_dir/name/1.0.0/` and returns the report (also written as build_report.json)."""
  if not json_files:
    raise ValueError('no JSON file given')
  if image_dir and not os.path.isdir(image_dir):
    raise FileNotFoundError(f'image folder not found: {image_dir}')
  cls = builder_class(name)
  version_dir = os.path.join(out_dir, name, str(cls.VERSION))
  if os.path.exists(version_dir):
    if not overwrite:
      raise FileExistsError(f'{version_dir} exists; pass overwrite=True (--overwrite) to rebuild it')
    shutil.rmtree(version_dir)
  builder = cls(json_files=json_files, image_dir=image_dir, num_threads=num_threads,
                progress_every=progress_every, data_dir=out_dir, file_format='array_record')
  download_dir = tempfile.mkdtemp(prefix='llava_build_')  # tfds wants one; we download nothing
  # tfds' bars say "Shuffling <dir>/incomplete.*" of a dataset kept in JSON order; the `[build split]` lines count.
  tfds.disable_progress_bar()
  try:
    builder.download_and_prepare(download_dir=download_dir)
  finally:
    shutil.rmtree(download_dir, ignore_errors=True)
  report = dict(name=name, version=str(cls.VERSION), data_dir=version_dir, image_dir=image_dir,
                splits={s: dict(r, skipped_by_reason=dict(r['skipped_by_reason']))
                        for s, r in builder.reports.items()})
  with open(os.path.join(version_dir, REPORT_FILE), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1, ensure_ascii=False)
  with open(os.path.join(version_dir, LENGTHS_FILE), 'w', encoding='utf-8') as f:
    json.dump(builder.lengths, f)
  return report
