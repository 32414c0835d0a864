"""The original release (`llava-torch` 1.2.2.post1, package `llava`) as a test oracle on transformers 5.

Only the pieces the tests compare against are imported: `llava.conversation` (templates, `get_prompt`),
the `preprocess_*` label functions of `llava.train.train` and the ScienceQA GPT-4 re-query scorer.
`llava.train.train` imports its trainer and model classes at module level, and those break on transformers 5
(`ALL_LAYERNORM_LAYERS` is gone from `transformers.trainer`); none of them is used by the label functions, so
empty stand-ins take their place in `sys.modules` while it is imported.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import io
import os
import random
import runpy
import sys
import types

# `llava/__init__.py` imports every model class (17 s here, and nothing the oracle needs): the package is
# registered by its path instead, so only the submodules asked for load.
_SPEC = importlib.util.find_spec('llava')
LLAVA_DIR = list(_SPEC.submodule_search_locations)[0]
if 'llava' not in sys.modules:
  _package = types.ModuleType('llava')
  _package.__path__ = [LLAVA_DIR]
  sys.modules['llava'] = _package
from llava import conversation  # noqa: E402  (plain module, imports on transformers 5 as is)

REQUERY_SCRIPT = os.path.join(LLAVA_DIR, 'eval', 'eval_science_qa_gpt4_requery.py')


@functools.cache
def train():
  """`llava.train.train`, imported with stand-ins for its trainer and model modules."""
  stubs = {'llava.model': types.ModuleType('llava.model'),
           'llava.train.llava_trainer': types.ModuleType('llava.train.llava_trainer')}
  stubs['llava.train.llava_trainer'].LLaVATrainer = object
  saved = {k: sys.modules.get(k) for k in stubs}
  sys.modules.update(stubs)
  try:
    return importlib.import_module('llava.train.train')
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def preprocess(template_name: str, conversations: list, tokenizer, has_image: bool,
               mm_use_im_start_end: bool = False) -> dict:
  """The original's labels for one LLaVA JSON conversation with `conv_templates[template_name]` as the
  default conversation (what `--version` does in its train.py). Returns {input_ids, labels} as lists; image
  positions hold its `IMAGE_TOKEN_INDEX` (-200) once.

  `preprocess_multimodal` runs first as in its dataset (image moved to the front, mmtag wrapping, <im_start> /
  <im_end> around it with `mm_use_im_start_end`); its
  `tokenizer.legacy` lookup needs the attribute, which byte-level BPE tokenizers lack (False: not legacy).
  """
  conv = conversation.conv_templates[template_name]
  sources = [copy.deepcopy(conversations)]
  saved = conversation.default_conversation
  conversation.default_conversation = conv
  added_legacy = not hasattr(tokenizer, 'legacy')
  if added_legacy:
    tokenizer.legacy = False
  try:
    if has_image:
      data_args = types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=mm_use_im_start_end)
      sources = train().preprocess_multimodal(sources, data_args)
    with contextlib.redirect_stdout(open(os.devnull, 'w')):  # its "tokenization mismatch" warnings
      out = train().preprocess(sources, tokenizer, has_image=has_image)
  finally:
    conversation.default_conversation = saved
    if added_legacy:
      del tokenizer.legacy
  return {'input_ids': [int(x) for x in out['input_ids'][0]], 'labels': [int(x) for x in out['labels'][0]]}


def multimodal_values(template_name: str, conversations: list) -> list:
  """The turn texts after the original's `preprocess_multimodal` (image to the front, mmtag wrapping)."""
  saved = conversation.default_conversation
  conversation.default_conversation = conversation.conv_templates[template_name]
  try:
    data_args = types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
    sources = train().preprocess_multimodal([copy.deepcopy(conversations)], data_args)
  finally:
    conversation.default_conversation = saved
  return [turn['value'] for turn in sources[0]]


def get_prompt(template_name: str, texts: list, *, image_in_first: bool = False) -> str:
  """`conv_templates[name].copy()` with `texts` (alternating user / assistant; None = the open assistant turn)
  appended, `get_prompt()`. `image_in_first` passes the first message as the (text, image, mode) tuple its web UI
  uses."""
  conv = conversation.conv_templates[template_name].copy()
  for i, text in enumerate(texts):
    if i == 0 and image_in_first:
      text = (text, None, 'Default')
    conv.append_message(conv.roles[i % 2], text)
  return conv.get_prompt()


def requery_score(base_dir: str, our_result: str, gpt4_result: str, requery_result: str, output_result: str,
                  seed: int, split: str = 'test') -> str:
  """Runs `eval_science_qa_gpt4_requery.py` as its command line does, after `random.seed(seed)`. Returns what
  it printed; its JSON lands in `output_result`."""
  argv = ['eval_science_qa_gpt4_requery.py', '--base-dir', base_dir, '--our-result', our_result,
          '--gpt4-result', gpt4_result, '--requery-result', requery_result, '--output-result', output_result,
          '--split', split]
  saved_argv = sys.argv
  sys.argv = argv
  random.seed(seed)
  try:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      runpy.run_path(REQUERY_SCRIPT, run_name='__main__')
  finally:
    sys.argv = saved_argv
  return buf.getvalue()
