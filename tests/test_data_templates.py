"""Every template of the original release, and today's LLM families, against their oracles (LLAVA.md §2, §3, §10).

- Strings: byte for byte the original's `Conversation.get_prompt()` (on the turns its `preprocess_multimodal`
  leaves) for every `conv_templates` key, and each model's own HF chat template where one exists.
- Supervised tokens: equal to the original's `preprocess_v1` / `preprocess_llama_2` / `preprocess_plain`, on the
  real SentencePiece model (mistral-common's, legacy and not). Where the original is wrong, the test asserts our
  exact labels and pins the original's difference (its documented defects: `test_original_defects_*`).
- The family tokenizers (tests/family_tokenizers.py): Mistral, Llama-3, Qwen2 with their own templates, exact.
- A template whose tokenizer lacks its special tokens stops with an error naming the file and key.
"""
import json

import numpy as np
import pytest

import family_tokenizers
import llava_original as original
from data_fixtures import CONV, TEXT_CONV, supervised_runs
from llava_jax.data import conversation
from llava_jax.data.conversation import TEMPLATES, normalize_turns, render
from llava_jax.data.tokenize import (IGNORE_INDEX, add_image_token, build_prompt, check_template_tokens,
                                     image_token_id, tokenize_conversation, tokenize_prompt)

ORIGINAL_NAMES = sorted(original.conversation.conv_templates)
CHATML = ('mpt', 'chatml_direct', 'mistral_direct')
V0 = ('default', 'v0', 'llava_v0', 'v0_mmtag')
# Templates whose labels the original computes right on a SentencePiece LLaMA/Mistral tokenizer.
PREPROCESS_EXACT = ('v1', 'vicuna_v1', 'llava_v1', 'v1_mmtag', 'llama_2', 'llava_llama_2', 'mistral_instruct')


@pytest.fixture(scope='module')
def toks(tmp_path_factory):
  from tokenizers import AddedToken
  root = tmp_path_factory.mktemp('tok')
  out = {'spm_legacy': family_tokenizers.mistral(str(root / 'legacy'), legacy=True),
         'spm': family_tokenizers.mistral(str(root / 'nonlegacy'), legacy=False),
         # The SentencePiece family with ChatML's tokens added, as e.g. Nous-Hermes-2 / Yi tokenizers hold them.
         'spm_chatml': family_tokenizers.mistral(str(root / 'chatml'), legacy=True),
         'llama3': family_tokenizers.llama3(), 'qwen2': family_tokenizers.qwen2()}
  out['spm_chatml'].add_tokens([AddedToken(t, special=True, normalized=False) for t in ('<|im_start|>', '<|im_end|>')],
                               special_tokens=True)
  for tok in out.values():
    add_image_token(tok)
    tok.model_max_length = 2048  # the original pads/truncates to it
    if tok.pad_token is None:
      tok.pad_token = tok.unk_token  # what the original's train.py does for v1 and LLaMA-2
  return out


def _conv(name, image=True):
  conv = CONV[:2] if TEMPLATES[name].style == 'plain' else CONV
  if not image:
    conv = [dict(t, value=t['value'].replace('<image>', '').strip()) for t in conv]
  return conv


def _runs(tok, out):
  return [tok.convert_ids_to_tokens(r) for r in supervised_runs(out['labels'])]


def _original_runs(tok, name, conv, has_image):
  labels = original.preprocess(name, conv, tok, has_image)['labels']
  return [tok.convert_ids_to_tokens(r) for r in supervised_runs(labels)]


# --------------------------------------------------------------------------------------------------- strings

@pytest.mark.parametrize('name', ORIGINAL_NAMES)
def test_strings_equal_original_get_prompt(name):
  values = original.multimodal_values(name, CONV)
  if TEMPLATES[name].style == 'plain':  # preprocess_plain's string: the question is dropped
    assert render(CONV[:2], name) == '<image>' + CONV[1]['value'] + '\n'
    return
  assert render(CONV, name) == original.get_prompt(name, values)
  # Generation prompt: the earlier turns, the next question, the assistant marker (its message None).
  assert build_prompt(CONV[:3], name) == original.get_prompt(name, values[:3] + [None])
  text_only = [t['value'] for t in _conv(name, image=False)]
  assert render(_conv(name, image=False), name) == original.get_prompt(name, text_only)
  if TEMPLATES[name].mmtag:  # its web UI (image passed as a tuple) inserts an exchange training never had
    ui = original.get_prompt(name, [CONV[0]['value']] + values[1:], image_in_first=True)
    assert '<Image><image></Image>' + original.conversation.conv_templates[name].sep + \
        original.conversation.conv_templates[name].roles[1] + ': Received.' in ui
    assert 'Received.' not in render(CONV, name)


def _messages(conv, system=None):
  turns, _ = normalize_turns(conv)
  return ([{'role': 'system', 'content': system}] if system else []) + [{'role': r, 'content': t} for r, t in turns]


@pytest.mark.parametrize('image', [True, False])
def test_strings_equal_hf_chat_templates(toks, image):
  conv = _conv('vicuna_v1', image)
  qwen, llama3, mistral = toks['qwen2'], toks['llama3'], toks['spm_legacy']
  hf = lambda tok, msgs, **kw: tok.apply_chat_template(msgs, tokenize=False, **kw)
  # Qwen2-Instruct (its default system) and Llama-3-Instruct (after BOS): exactly.
  assert render(conv, 'qwen_2') == hf(qwen, _messages(conv))
  assert build_prompt(conv[:3], 'qwen_2') == hf(qwen, _messages(conv[:3]), add_generation_prompt=True)
  system = conversation.SYSTEM_LLAMA_2
  assert '<|begin_of_text|>' + render(conv, 'llama_3') == hf(llama3, _messages(conv, system))
  assert '<|begin_of_text|>' + build_prompt(conv[:3], 'llama_3') == hf(
      llama3, _messages(conv[:3], system), add_generation_prompt=True)
  # Llama-2-chat: the llama_2 templates are its format (after BOS).
  for name in ('llama_2', 'llava_llama_2'):
    assert '<s>' + render(conv, name) == hf(mistral, _messages(conv, TEMPLATES[name].system),
                                            chat_template=family_tokenizers.LLAMA2_CHAT_TEMPLATE)
  # Documented differences of the original's own templates from the models' HF templates:
  # mistral_instruct puts a space before each answer and before </s> (Mistral-Instruct's template has neither);
  # chatml_direct has no newline after <|im_end|> (ChatML's has one).
  ours = render(conv, 'mistral_instruct')
  assert '<s>' + ours.replace('[/INST] ', '[/INST]').replace(' </s>', '</s>') == hf(mistral, _messages(conv))
  assert ours != hf(mistral, _messages(conv))[len('<s>'):]
  chatml = hf(qwen, _messages(conv, 'Answer the questions.'))
  assert render(conv, 'chatml_direct') == chatml.replace('<|im_end|>\n', '<|im_end|>')


# ----------------------------------------------------------------------------------- labels vs the original

@pytest.mark.parametrize('legacy', [True, False])
@pytest.mark.parametrize('name', PREPROCESS_EXACT + ('plain', 'v0_plain'))
def test_supervised_tokens_equal_original(toks, name, legacy):
  tok = toks['spm_legacy' if legacy else 'spm']
  for image in (True, False) if TEMPLATES[name].style != 'plain' else (True,):
    conv = _conv(name, image)
    ours = tokenize_conversation(conv, tok, name, 1, None)
    runs = _runs(tok, ours)
    if name in ('plain', 'v0_plain') and not legacy:
      # The original tokenizes the caption as a string of its own, so non-legacy SentencePiece prefixes '▁'; we
      # tokenize the whole text with <image> a special token (as HF processors do) and no '▁' follows it.
      assert runs == [['A', '▁cat', '.', '<0x0A>']]
      assert _original_runs(tok, name, conv, image) == [['▁A', '▁cat', '.', '<0x0A>']]
      continue
    assert runs == _original_runs(tok, name, conv, image), (name, image)
    assert len(runs) == len(conv) // 2


def test_original_defects_v0_masks_drift(toks):
  """The original trains v0 templates with `preprocess` (a `### Human: q\\n### Assistant: a\\n` string, unlike its
  own get_prompt) and masks by counting tokens of each turn alone with a fixed +2 offset: the masks drift into the
  role words and the next question. Ours: exactly each answer and its `###`."""
  tok = toks['spm_legacy']
  for name in V0:
    for image in (True, False):
      conv = _conv(name, image)
      ours = _runs(tok, tokenize_conversation(conv, tok, name, 1, None))
      assert ours == [['▁A', '▁cat', '.', '###'], ['▁', '3', '▁cats', '###']]
      theirs = _original_runs(tok, name, conv, image)
      assert theirs[1][:2] == ['▁Assistant', ':'] and '▁Human' in theirs[1] and '▁How' in theirs[1]


def test_original_defects_chatml(toks):
  """preprocess_mpt (mpt, chatml_direct): on a legacy SentencePiece tokenizer its first round is one token early
  (the newline after `assistant`, without `<|im_end|>`); on a non-legacy one (`legacy=False`), or on a tokenizer
  without BOS (Qwen2), its counts never match and every sample is silently zeroed. Ours: each answer and its `<|im_end|>`."""
  tok = toks['spm_chatml']
  im_end = ['<|im_end|>']
  for name in CHATML:
    for image in (True, False):
      conv = _conv(name, image)
      ours = _runs(tok, tokenize_conversation(conv, tok, name, 1, None))
      assert ours == [['A', '▁cat', '.'] + im_end, ['3', '▁cats'] + im_end]
      theirs = _original_runs(tok, name, conv, image)
      assert theirs == [['<0x0A>'] + ours[0][:-1], ours[1]]
  tok.legacy = False  # the flag the original branches on: a non-legacy tokenizer of the same model
  try:
    assert _original_runs(tok, 'chatml_direct', CONV, True) == []
  finally:
    tok.legacy = True
  qwen = toks['qwen2']
  enc = lambda s: qwen(s, add_special_tokens=False)['input_ids']
  for name in CHATML + ('qwen_2',):
    out = tokenize_conversation(CONV, qwen, name, 1, None)
    assert supervised_runs(out['labels']) == [enc('A cat.<|im_end|>'), enc('3 cats<|im_end|>')]
  assert _original_runs(qwen, 'chatml_direct', CONV, True) == []


# ------------------------------------------------------------------------------------------ family tokenizers

FAMILY_TEMPLATES = {'spm_legacy': ('mistral_instruct', 'vicuna_v1', 'llava_llama_2'), 'llama3': ('llama_3',),
                    'qwen2': ('qwen_2', 'chatml_direct')}
STOP = {'mistral_instruct': ' </s>', 'llava_llama_2': ' </s>', 'vicuna_v1': '</s>', 'llama_3': '<|eot_id|>',
        'qwen_2': '<|im_end|>', 'chatml_direct': '<|im_end|>'}


@pytest.mark.parametrize('family', sorted(FAMILY_TEMPLATES))
def test_family_labels_exact(toks, family):
  """Each family with its templates: input ids equal the tokenizer's own encoding of the rendered text, each answer
  is one supervised run equal to the answer + stop marker encoded alone, images expand, prompts are prefixes."""
  tok = toks[family]
  n_img = 3
  for name in FAMILY_TEMPLATES[family]:
    check_template_tokens(tok, name, family)
    out = tokenize_conversation(CONV, tok, name, n_img, None)
    ids = out['input_ids']
    image = image_token_id(tok)
    assert (ids == image).sum() == n_img and not (out['labels'][ids == image] != IGNORE_INDEX).any()
    text = tokenize_conversation(TEXT_CONV, tok, name, n_img, None)
    np.testing.assert_array_equal(text['input_ids'], tok(render(TEXT_CONV, name, bos=tok.bos_token or '',
                                                                eos=tok.eos_token))['input_ids'])
    runs = supervised_runs(out['labels'])
    answers = [t['value'] for t in CONV[1::2]]
    assert [tok.decode(r).lstrip() for r in runs] == [a + STOP[name] for a in answers]
    if family != 'spm_legacy':  # byte-level BPE: an answer after its header newline encodes as it does alone
      stop = tok.convert_tokens_to_ids(STOP[name])
      assert runs == [tok(a, add_special_tokens=False)['input_ids'] + [stop] for a in answers]
    starts = [i for i in range(1, len(ids)) if out['labels'][i] != IGNORE_INDEX and out['labels'][i - 1] == IGNORE_INDEX]
    for turn, start in zip(range(1, len(CONV), 2), starts):
      np.testing.assert_array_equal(tokenize_prompt(CONV[:turn], tok, name, n_img), ids[:start])


ALPHABET = list('abcXYZ0123456789 .,!?\n') + ['é', '中文', '🙂', '  ', '\t', '<|im', 'assistant', '[/INST]', '###']


@pytest.mark.parametrize('family', sorted(FAMILY_TEMPLATES))
def test_family_random_conversations_never_mismatch(toks, family):
  tok = toks[family]
  rng = np.random.default_rng(1)
  text = lambda: ''.join(ALPHABET[i] for i in rng.integers(len(ALPHABET), size=rng.integers(1, 10))).strip() or 'x'
  squash = lambda s: ''.join(s.split())
  for trial in range(24):
    name = FAMILY_TEMPLATES[family][trial % len(FAMILY_TEMPLATES[family])]
    conv = []
    for k in range(int(rng.integers(1, 4))):
      conv += [{'from': 'human', 'value': ('<image>\n' if k == 0 and trial % 2 else '') + text()},
               {'from': 'gpt', 'value': text()}]
    out = tokenize_conversation(conv, tok, name, 2, None)
    runs = supervised_runs(out['labels'])
    assert [squash(tok.decode(r)) for r in runs] == [squash(t['value'] + STOP[name]) for t in conv[1::2]], conv


# --------------------------------------------------------------------------------------------- bad tokenizers

def test_template_without_its_special_tokens_names_file_and_key(toks, tmp_path):
  for family, name, token in (('spm_legacy', 'chatml_direct', '<|im_start|>'), ('spm_legacy', 'qwen_2', '<|im_end|>'),
                              ('qwen2', 'llama_3', '<|start_header_id|>'), ('llama3', 'mpt', '<|im_start|>')):
    with pytest.raises(ValueError, match=rf"tok/{family}: data\.template='{name}' needs special tokens.*"
                                         rf"{token.replace('|', '[|]')}"):
      check_template_tokens(toks[family], name, f'tok/{family}', key='data.template')
  no_eos = family_tokenizers.qwen2()
  no_eos.eos_token = None
  with pytest.raises(ValueError, match="template='vicuna_v1' needs special tokens \\['eos_token'\\]"):
    check_template_tokens(no_eos, 'vicuna_v1', 'x')
  check_template_tokens(no_eos, 'plain', 'x')  # plain needs none
  # Through a CLI: the inspector stops before reading any sample.
  from llava_jax.data import inspect
  toks['qwen2'].save_pretrained(tmp_path / 'qwen2')
  data = tmp_path / 'data.json'
  data.write_text(json.dumps([{'id': '0', 'conversations': TEXT_CONV}]))
  assert inspect.main(['--data', str(data), '--tokenizer', str(tmp_path / 'qwen2'), '--template', 'llama_3']) == 1


def test_generation_stops_at_the_turn_end():
  """ChatML / Llama-3 turn ends stop generation even when the tokenizer's EOS is another token (Yi's
  `<|endoftext|>`, base Llama-3's `<|end_of_text|>`), as the original's stop string `conv.sep` does."""
  from llava_jax.inference import stop_strings_for
  assert stop_strings_for('qwen_2') == stop_strings_for('chatml_direct') == stop_strings_for('mpt') == ('<|im_end|>',)
  assert stop_strings_for('llama_3') == ('<|eot_id|>',)
  assert stop_strings_for('v0') == stop_strings_for('v0_mmtag') == ('###',)
  assert stop_strings_for('mistral_instruct') == stop_strings_for('v1_mmtag') == ()  # EOS ends those
