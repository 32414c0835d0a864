"""Offline tokenizers of today's LLM families, each with its family's special tokens and HF chat template.

No hub download works here, so each family is rebuilt from what defines it for tokenization:
- `mistral(tmp_dir)`: the real Mistral/LLaMA SentencePiece model shipped in mistral-common
  (`data/tokenizer.model.v1`, 32000 pieces) through transformers' LlamaTokenizer, with the
  Mistral-7B-Instruct chat template.
- `llama3()`: a byte-level BPE with Llama-3's pre-tokenizer split (digits in groups of 1-3), its special tokens
  (`<|begin_of_text|>` BOS added by the post-processor, `<|eot_id|>` EOS of the instruct models, the header
  tokens, reserved tokens) and the Llama-3-Instruct chat template.
- `qwen2()`: a byte-level BPE with Qwen2's split (single digits), NFC normalizer, no BOS, `<|im_end|>` EOS,
  `<|endoftext|>` pad and the Qwen2-Instruct ChatML chat template.
The BPE merges are trained here on a small corpus (a few hundred entries instead of 128K/151K), so ids differ
from the real models but every rule that decides *where* tokens split and which strings are special is the
family's own. None of them has `<image>`; `llava_jax.data.tokenize.add_image_token` appends it.
"""
from __future__ import annotations

import os
import shutil

from data_fixtures import SPM_MODEL

# HF chat templates (tokenizer_config.json "chat_template") of the instruct models.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Llama-2-chat's, for the llama_2 templates (its tokenizer is the same SentencePiece family as Mistral's).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

# The pre-tokenizer regexes of the released tokenizer.json files: they differ only in how digits group.
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}DIGITS| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = _SPLIT.replace('DIGITS', '{1,3}')
QWEN2_SPLIT = _SPLIT.replace('DIGITS', '')

LLAMA3_SPECIALS = ('<|begin_of_text|>', '<|end_of_text|>', '<|reserved_special_token_0|>',
                   '<|reserved_special_token_1|>', '<|start_header_id|>', '<|end_header_id|>',
                   '<|reserved_special_token_2|>', '<|eot_id|>')
QWEN2_SPECIALS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>')

# Text the BPE merges are learnt from: the templates' words plus everyday text, digits, unicode.
CORPUS = (
    'A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, '
    "detailed, and polite answers to the user's questions. You are a helpful language and vision assistant. "
    'You are able to understand the visual content that the user provides, and assist the user with a variety '
    'of tasks using natural language. Answer the questions. What is in the image? A cat. How many? 3 cats. '
    'Name a colour. Blue, like the sky. system user assistant Human: Assistant: USER: ASSISTANT: ### [INST] '
    '[/INST] <<SYS>> <</SYS>> 12345 2024 café 中文 🙂 The answer is B. Context: N/A Options: (A) yes (B) no\n')


def _byte_level_bpe(split: str, specials, *, nfc: bool, vocab_size: int = 600):
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(ignore_merges=True))
  if nfc:
    tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(split), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([CORPUS] * 4, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  return tok


def llama3():
  """Llama-3-Instruct-style tokenizer: BOS `<|begin_of_text|>` added by the post-processor, EOS `<|eot_id|>`."""
  from tokenizers import processors
  from transformers import PreTrainedTokenizerFast
  tok = _byte_level_bpe(LLAMA3_SPLIT, LLAMA3_SPECIALS, nfc=False)
  bos = '<|begin_of_text|>'
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single=f'{bos}:0 $A:0', pair=f'{bos}:0 $A:0 {bos}:1 $B:1',
                                    special_tokens=[(bos, tok.token_to_id(bos))])])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token='<|eot_id|>',
                                 chat_template=LLAMA3_CHAT_TEMPLATE, model_max_length=8192)


def qwen2():
  """Qwen2-Instruct-style tokenizer: no BOS, EOS `<|im_end|>`, pad `<|endoftext|>`."""
  from tokenizers import processors
  from transformers import PreTrainedTokenizerFast
  tok = _byte_level_bpe(QWEN2_SPLIT, QWEN2_SPECIALS, nfc=True)
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|im_end|>', pad_token='<|endoftext|>',
                                 unk_token=None, chat_template=QWEN2_CHAT_TEMPLATE, model_max_length=32768)


def mistral(tmp_dir: str, legacy: bool = True):
  """The real SentencePiece model (mistral-common's v1, as Mistral-7B's) with the Mistral-Instruct template."""
  from transformers import LlamaTokenizer
  os.makedirs(tmp_dir, exist_ok=True)
  shutil.copy(SPM_MODEL, os.path.join(tmp_dir, 'tokenizer.model'))
  return LlamaTokenizer.from_pretrained(tmp_dir, legacy=legacy, add_bos_token=True, chat_template=MISTRAL_CHAT_TEMPLATE)


def families(tmp_dir: str) -> dict:
  """{'mistral', 'llama3', 'qwen2'} -> tokenizer."""
  return {'mistral': mistral(os.path.join(tmp_dir, 'mistral')), 'llama3': llama3(), 'qwen2': qwen2()}
