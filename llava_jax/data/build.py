"""Build a TFDS ArrayRecord dataset from LLaVA JSON + an image folder.

  python -m llava_jax.data.build --json llava_instruct_150k.json --images coco/train2017 \\
      --out ~/tfds --name llava_instruct

Writes OUT/NAME/1.1.0/ (shards, build_report.json, modality_lengths.json). Bad entries are skipped,
counted by reason and listed (index, id, reason) in build_report.json; the build fails only when the
JSON file itself cannot be read or no entry is valid.
"""
from __future__ import annotations

import argparse
import sys

from llava_jax.data.builder import REPORT_FILE, build_dataset


def _parse_json_args(values: list[str]) -> dict[str, str]:
  """`F` (split train) or `SPLIT=F`, repeatable."""
  files = {}
  for v in values:
    split, sep, path = v.partition('=')
    split, path = (split, path) if sep and split.isidentifier() else ('train', v)
    if split in files:
      raise SystemExit(f'error: split {split!r} given twice in --json')
    files[split] = path
  return files


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m llava_jax.data.build', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--json', action='append', required=True, metavar='[SPLIT=]FILE',
                 help='LLaVA JSON list (or .jsonl); repeat with SPLIT=FILE for more splits (default split: train)')
  p.add_argument('--images', default='', help='folder the "image" paths are relative to')
  p.add_argument('--out', required=True, help='TFDS data dir to write into')
  p.add_argument('--name', default='llava_instruct', help='dataset name (snake_case)')
  p.add_argument('--overwrite', action='store_true', help='replace an existing build of this name/version')
  p.add_argument('--num-threads', type=int, default=None, help='threads checking images (default min(8, cpus))')
  p.add_argument('--progress-every', type=int, default=10000, help='print progress every N entries')
  args = p.parse_args(argv)
  try:
    report = build_dataset(_parse_json_args(args.json), args.images, args.out, name=args.name,
                           overwrite=args.overwrite, num_threads=args.num_threads,
                           progress_every=args.progress_every)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for split, r in report['splits'].items():
    print(f'{split}: {r["num_written"]} written, {r["num_skipped"]} skipped of {r["num_entries"]} '
          f'entries {r["skipped_by_reason"] or ""}')
    if r['num_skipped']:
      print(f'  WARNING: {r["num_skipped"]} entries skipped; ids and reasons in '
            f'{report["data_dir"]}/{REPORT_FILE}', file=sys.stderr)
  print(f'dataset: {report["data_dir"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
