"""Helpers for the multi-process tests: a tiny dataset, and a worker that runs the real trainer entry point.

  python tests/multihost_worker.py RECORD_DIR [python -m llava_jax.train arguments...]

The worker runs `llava_jax.train.__main__.main` unchanged (the same start-up from LLAVA_* env or flags, data
sharding, checkpoints and logging as a cluster job) and records which dataset records this process read
(`RECORD_DIR/process_<i>.jsonl`, the record ids of each batch).
"""
from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = {'red': (220, 30, 30), 'green': (30, 200, 30), 'blue': (30, 30, 220)}
WORDS = ('A chat between a curious user and an artificial intelligence assistant . The gives helpful , detailed '
         "polite answers to the user's questions USER ASSISTANT : What color is square ? red green blue").split()


def build_dataset(root: str, num_records: int = 40) -> tuple[str, str, int]:
  """(tfds dir, tokenizer dir, image token id) of `num_records` questions about a coloured square."""
  import numpy as np
  from PIL import Image
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  from llava_jax.data.builder import build_dataset as build

  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  entries = []
  for i in range(num_records):
    name = list(COLORS)[i % 3]
    img = np.full((32, 32, 3), 128, np.uint8)
    img[4 + i % 8:20 + i % 8, 8:24] = COLORS[name]
    Image.fromarray(img).save(os.path.join(root, 'images', f'{i}.png'))
    entries.append({'id': str(i), 'image': f'{i}.png', 'conversations': [
        {'from': 'human', 'value': '<image>\nWhat color is the square?'},
        {'from': 'gpt', 'value': f'The square is {name}.'}]})
  with open(os.path.join(root, 'train.json'), 'w') as f:
    json.dump(entries, f)
  vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, '<pad>': 3}
  for w in WORDS:
    vocab.setdefault(w, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  tok.decoder = decoders.WordPiece()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>', pad_token='<pad>',
                                 unk_token='<unk>')
  fast.save_pretrained(os.path.join(root, 'tokenizer'))
  build({'train': os.path.join(root, 'train.json')}, os.path.join(root, 'images'), os.path.join(root, 'tfds'),
        name='colors')
  return os.path.join(root, 'tfds'), os.path.join(root, 'tokenizer'), len(vocab)  # <image> comes next


class _RecordingPipeline:
  """Wraps the trainer's input iterator: appends the record ids of each batch this process takes to
  `<record_dir>/process_<i>.jsonl` (one line per step of this run), and SIGKILLs this process when it is about to
  take batch number `kill_at` of this run (env MULTIHOST_KILL_AT=PROCESS:CALL), like a host dying mid-run."""

  def __init__(self, inner, record_dir: str):
    self._inner, self._dir, self._calls = inner, record_dir, 0

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def __iter__(self):
    return self

  def __next__(self):
    import jax
    self._calls += 1
    kill = os.environ.get('MULTIHOST_KILL_AT')
    if kill and tuple(map(int, kill.split(':'))) == (jax.process_index(), self._calls):
      os.kill(os.getpid(), 9)
    batch = next(self._inner)
    with open(os.path.join(self._dir, f'process_{jax.process_index()}.jsonl'), 'a') as f:
      f.write(json.dumps({'call': self._calls, 'index': batch['index'].tolist()}) + '\n')
    return batch


def main(argv) -> int:
  record_dir, argv = argv[0], argv[1:]
  os.makedirs(record_dir, exist_ok=True)
  sys.path.insert(0, REPO)
  from llava_jax.train import __main__ as entry
  from llava_jax.train import trainer

  make_pipeline = trainer.make_pipeline
  trainer.make_pipeline = lambda *a, **k: _RecordingPipeline(make_pipeline(*a, with_index=True, **k), record_dir)
  return entry.main(argv)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
