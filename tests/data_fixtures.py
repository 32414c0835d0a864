"""Shared helpers for the data tests: real tokenizers, a tiny trained BPE, a small built dataset."""
from __future__ import annotations

import os
import shutil

import mistral_common
import numpy as np

SPM_MODEL = os.path.join(os.path.dirname(mistral_common.__file__), 'data', 'tokenizer.model.v1')

# One conversation with the image placeholder at the end of the question (it must move to the front),
# an answer starting with a digit (SentencePiece splits off a lone '▁') and a text-only twin.
CONV = [
    {'from': 'human', 'value': 'What is in the image?\n<image>'},
    {'from': 'gpt', 'value': 'A cat.'},
    {'from': 'human', 'value': 'How many?'},
    {'from': 'gpt', 'value': '3 cats'},
]
TEXT_CONV = [{'from': 'human', 'value': 'Name a colour.'}, {'from': 'gpt', 'value': 'Blue, like the sky.'}]


def llama_tokenizer(tmp_dir: str, legacy: bool):
  """mistral-common's LLaMA-family SentencePiece model through transformers' LlamaTokenizer."""
  from transformers import LlamaTokenizer
  os.makedirs(tmp_dir, exist_ok=True)
  shutil.copy(SPM_MODEL, os.path.join(tmp_dir, 'tokenizer.model'))
  return LlamaTokenizer.from_pretrained(tmp_dir, legacy=legacy)


def sentencepiece_backend_tokenizer():
  """The same model through the pure-Python SentencePiece backend: it has no offset mappings."""
  from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
  return SentencePieceBackend(vocab_file=SPM_MODEL, bos_token='<s>', eos_token='</s>', unk_token='<unk>')


def gpt2_style_bpe():
  """A byte-level BPE trained here on a tiny corpus, GPT-2 style (ByteLevel post-processor that
  trims offsets), without an <image> token."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  corpus = ['A chat between a curious user and an artificial intelligence assistant.',
            'What is in the image? A cat. How many? 3 cats. Blue, like the sky.',
            'USER: ASSISTANT: ###Human: ###Assistant: [INST] <<SYS>> [/INST]'] * 20
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=True)
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<unk>', '<s>', '</s>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>', unk_token='<unk>')


def supervised_runs(labels) -> list[list[int]]:
  """Contiguous runs of supervised label ids."""
  runs, cur = [], []
  for x in list(labels) + [-100]:
    if x != -100:
      cur.append(int(x))
    elif cur:
      runs.append(cur)
      cur = []
  return runs


def build_demo_data(root: str, *, num_train: int = 12, image_size: int = 32, max_objects: int = 2) -> dict:
  """Writes the synthetic demo and builds its stage-2 TFDS dataset. Returns paths + tokenizer."""
  from transformers import AutoTokenizer
  from llava_jax.data.builder import build_dataset
  from llava_jax.demo.synthetic import write_demo
  meta = write_demo(os.path.join(root, 'demo'), num_train=num_train, num_qa=8, image_size=image_size,
                    max_objects=max_objects, seed=0, progress_every=0)
  report = build_dataset({'train': meta['paths']['stage2']}, meta['paths']['images'], os.path.join(root, 'tfds'),
                         name='demo_stage2', progress_every=0)
  tokenizer = AutoTokenizer.from_pretrained(meta['paths']['tokenizer'])
  return dict(meta=meta, report=report, data_dir=report['data_dir'], tokenizer=tokenizer)


def take(it, n=None) -> list:
  """The first `n` batches of an iterator (all without `n`)."""
  out = []
  for b in it:
    out.append(b)
    if n is not None and len(out) == n:
      break
  return out


def batches_equal(a, b) -> bool:
  return len(a) == len(b) and all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x)
                                  for x, y in zip(a, b))
