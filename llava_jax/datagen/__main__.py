r"""GPT-assisted instruction data and stage-1 caption data (paper section 3).

  python -m llava_jax.datagen instruct --captions captions.json --instances instances.json \
      --out data/instruct --base-url https://api.openai.com/v1 --model gpt-4o-mini
  python -m llava_jax.datagen pretrain --input pairs.tsv --out data/pretrain.json --filter
"""
import argparse
import sys

from llava_jax import api_client
from llava_jax.datagen import instruct, pretrain


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m llava_jax.datagen', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  instruct.add_args(sub.add_parser(
      'instruct', help='COCO annotations -> conversation/detail/complex instruction data via a chat API',
      description=instruct.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
  pretrain.add_args(sub.add_parser(
      'pretrain', help='image-caption pairs -> single-turn brief-description samples',
      description=pretrain.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return {'instruct': instruct.main, 'pretrain': pretrain.main}[args.command](args)
  except (FileNotFoundError, ValueError, api_client.ApiError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
