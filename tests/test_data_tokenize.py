"""Exact supervised token sequences (LLAVA.md §3) on a SentencePiece LLaMA tokenizer (legacy and not),
a byte-level BPE, and a tokenizer without offset mappings; truncation; generation prompts."""
import numpy as np
import pytest

from data_fixtures import (CONV, TEXT_CONV, gpt2_style_bpe, llama_tokenizer, sentencepiece_backend_tokenizer,
                           supervised_runs)
from llava_jax.data.tokenize import (IGNORE_INDEX, add_image_token, build_prompt, image_token_id, tokenize_conversation,
                                     tokenize_prompt)

TEMPLATES = ('plain', 'llava_v0', 'vicuna_v1', 'llava_v1', 'llava_llama_2')
N_IMG = 5


@pytest.fixture(scope='module')
def tokenizers(tmp_path_factory):
  out = {}
  for legacy in (True, False):
    out[f'spm_legacy={legacy}'] = llama_tokenizer(str(tmp_path_factory.mktemp(f'spm{legacy}')), legacy)
  out['bpe'] = gpt2_style_bpe()
  out['spm_python'] = sentencepiece_backend_tokenizer()
  for t in out.values():
    add_image_token(t)
  return out


def _conv(template):
  return CONV[:2] if template == 'plain' else CONV


def _tokens(tok, ids):
  return tok.convert_ids_to_tokens([int(i) for i in ids])


# Hand-checked SentencePiece pieces of every answer (+ its end marker), per template.
SPM_EXPECTED = {
    'vicuna_v1': [['▁A', '▁cat', '.', '</s>'], ['▁', '3', '▁cats', '</s>']],
    'llava_v1': [['▁A', '▁cat', '.', '</s>'], ['▁', '3', '▁cats', '</s>']],
    'llava_v0': [['▁A', '▁cat', '.', '###'], ['▁', '3', '▁cats', '###']],
    'llava_llama_2': [['▁A', '▁cat', '.', '▁', '</s>'], ['▁', '3', '▁cats', '▁', '</s>']],
}


@pytest.mark.parametrize('legacy', [True, False])
@pytest.mark.parametrize('template', TEMPLATES)
def test_sentencepiece_exact_supervised_tokens(tokenizers, legacy, template):
  tok = tokenizers[f'spm_legacy={legacy}']
  out = tokenize_conversation(_conv(template), tok, template, N_IMG, 2048)
  ids, labels = out['input_ids'], out['labels']
  runs = [_tokens(tok, r) for r in supervised_runs(labels)]
  if template == 'plain':  # after the special <image>, only legacy prepends '▁'
    assert runs == [['▁A' if legacy else 'A', '▁cat', '.', '<0x0A>']]
  else:
    assert runs == SPM_EXPECTED[template]
  sup = labels != IGNORE_INDEX
  np.testing.assert_array_equal(labels[sup], ids[sup])
  # BOS first, then the image: N copies of its id, unsupervised.
  image_id = image_token_id(tok)
  assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
  assert (ids == image_id).sum() == N_IMG and not sup[ids == image_id].any()
  first = int(np.argmax(ids == image_id))
  assert (ids[first:first + N_IMG] == image_id).all()
  assert not out['truncated'] and not out['dropped'] and out['has_image']


@pytest.mark.parametrize('template', TEMPLATES)
def test_byte_level_bpe_exact_supervised_tokens(tokenizers, template):
  tok = tokenizers['bpe']
  out = tokenize_conversation(_conv(template), tok, template, N_IMG, 2048)
  runs = supervised_runs(out['labels'])
  # Oracle independent of offsets: byte-level BPE tokenizes each answer span alone the same way.
  eos = [tok.eos_token_id]
  enc = lambda s: tok(s, add_special_tokens=False)['input_ids']
  expected = {
      'plain': [enc('A cat.\n')],
      'llava_v0': [enc(' A cat.###'), enc(' 3 cats###')],
      'vicuna_v1': [enc(' A cat.') + eos, enc(' 3 cats') + eos],
      'llava_v1': [enc(' A cat.') + eos, enc(' 3 cats') + eos],
      'llava_llama_2': [enc(' A cat. ') + eos, enc(' 3 cats ') + eos],
  }[template]
  assert runs == expected
  assert tok.decode(runs[0]) == {'plain': 'A cat.\n', 'llava_v0': ' A cat.###', 'llava_llama_2': ' A cat. </s>'}.get(
      template, ' A cat.</s>')
  # The trained BPE had no <image>: add_image_token appended it as a special token.
  assert tok.convert_ids_to_tokens(image_token_id(tok)) == '<image>' and image_token_id(tok) == len(tok) - 1
  assert (out['input_ids'] == image_token_id(tok)).sum() == N_IMG


@pytest.mark.parametrize('name', ['spm_legacy=True', 'spm_legacy=False', 'bpe', 'spm_python'])
@pytest.mark.parametrize('template', TEMPLATES)
def test_text_only_and_prompt_prefix(tokenizers, name, template):
  tok = tokenizers[name]
  text = tokenize_conversation(TEXT_CONV, tok, template, N_IMG, None)
  assert not text['has_image'] and image_token_id(tok) not in text['input_ids'].tolist()
  assert len(supervised_runs(text['labels'])) == 1
  # Generation prompt == every token before the answer it would generate, for each assistant turn.
  conv = _conv(template)
  full = tokenize_conversation(conv, tok, template, N_IMG, None)
  starts = [i for i in range(len(full['labels'])) if full['labels'][i] != IGNORE_INDEX and
            (i == 0 or full['labels'][i - 1] == IGNORE_INDEX)]
  for turn, start in zip(range(1, len(conv), 2), starts):
    prompt = tokenize_prompt(conv[:turn], tok, template, N_IMG)
    np.testing.assert_array_equal(prompt, full['input_ids'][:start])


@pytest.mark.parametrize('template', TEMPLATES)
def test_python_backend_builds_masks_by_construction(tokenizers, template):
  """No offset mapping: each answer piece is tokenized on its own, so its ids are exactly the run."""
  tok = tokenizers['spm_python']
  assert not getattr(tok, 'is_fast', False)
  out = tokenize_conversation(_conv(template), tok, template, N_IMG, None)
  enc = lambda s: tok(s, add_special_tokens=False)['input_ids']
  expected = {'plain': [enc('A cat.\n')], 'llava_v0': [enc(' A cat.###'), enc(' 3 cats###')],
              'llava_llama_2': [enc(' A cat. </s>'), enc(' 3 cats </s>')]}.get(
                  template, [enc(' A cat.</s>'), enc(' 3 cats</s>')])
  assert supervised_runs(out['labels']) == expected
  assert (out['input_ids'] == image_token_id(tok)).sum() == N_IMG


def test_truncation_never_cuts_the_image(tokenizers):
  tok = tokenizers['spm_legacy=False']
  full = tokenize_conversation(CONV, tok, 'vicuna_v1', N_IMG, None)
  n = len(full['input_ids'])
  image_end = int(np.flatnonzero(full['input_ids'] == image_token_id(tok))[-1]) + 1
  first_sup = int(np.flatnonzero(full['labels'] != IGNORE_INDEX)[0])
  # Cut inside the last answer: kept, counted as truncated, a prefix of the full sample.
  cut = tokenize_conversation(CONV, tok, 'vicuna_v1', N_IMG, n - 2)
  assert cut['truncated'] and not cut['dropped'] and len(cut['input_ids']) == n - 2
  np.testing.assert_array_equal(cut['input_ids'], full['input_ids'][:n - 2])
  np.testing.assert_array_equal(cut['labels'], full['labels'][:n - 2])
  # Exactly fitting: not truncated.
  assert not tokenize_conversation(CONV, tok, 'vicuna_v1', N_IMG, n)['truncated']
  # Through the image tokens: dropped, never a partial image.
  img = tokenize_conversation(CONV, tok, 'vicuna_v1', N_IMG, image_end - 1)
  assert img['dropped'] and img['drop_reason'] == 'image_cut' and len(img['input_ids']) == 0
  # After the image but before any answer: nothing to learn, dropped.
  none = tokenize_conversation(CONV, tok, 'vicuna_v1', N_IMG, first_sup)
  assert none['dropped'] and none['drop_reason'] == 'no_supervised_tokens'


ALPHABET = list('abcdefghij XYZ0123456789.,!?\n') + ['é', '中文', '🙂', '  ', '\t', 'ASSISTANT', '###', '[/INST]']


@pytest.mark.parametrize('name', ['spm_legacy=True', 'spm_legacy=False', 'bpe'])
def test_random_conversations_never_mismatch(tokenizers, name):
  """Random text (unicode, digits, odd whitespace, template-like words): every answer is supervised
  as exactly one run that decodes back to it, and the prompt before it is its generation prompt."""
  tok = tokenizers[name]
  rng = np.random.default_rng(0)
  text = lambda: ''.join(ALPHABET[i] for i in rng.integers(len(ALPHABET), size=rng.integers(1, 12))).strip() or 'x'
  for trial in range(40):
    template = TEMPLATES[trial % len(TEMPLATES)]
    n_turns = 1 if template == 'plain' else int(rng.integers(1, 4))
    conv = []
    for k in range(n_turns):
      conv += [{'from': 'human', 'value': ('<image>\n' if k == 0 and trial % 2 else '') + text()},
               {'from': 'gpt', 'value': text()}]
    out = tokenize_conversation(conv, tok, template, 3, None)
    runs = supervised_runs(out['labels'])
    answers = [t['value'] for t in conv[1::2]]
    assert len(runs) == len(answers), (template, conv)
    end = {'plain': '\n', 'llava_v0': '###', 'llava_llama_2': ' </s>'}.get(template, '</s>')
    squash = lambda s: ''.join(s.split())
    for run, answer in zip(runs, answers):
      assert squash(tok.decode(run)) == squash(answer + end), (template, conv)
    if template != 'plain':
      starts = [i for i in range(1, len(out['labels'])) if out['labels'][i] != IGNORE_INDEX and
                out['labels'][i - 1] == IGNORE_INDEX]
      for turn, start in zip(range(1, len(conv), 2), starts):
        np.testing.assert_array_equal(tokenize_prompt(conv[:turn], tok, template, 3), out['input_ids'][:start])


def test_image_token_helpers(tokenizers, tmp_path):
  tok = llama_tokenizer(str(tmp_path), legacy=False)
  with pytest.raises(ValueError, match='add_image_token'):
    tokenize_conversation(CONV, tok, 'vicuna_v1', N_IMG, None)
  n = len(tok)
  assert add_image_token(tok) == n == 32000 and len(tok) == n + 1
  assert add_image_token(tok) == n and len(tok) == n + 1  # idempotent
  assert tok('<image>', add_special_tokens=False)['input_ids'] == [n]
  assert build_prompt(CONV[:1], 'vicuna_v1').endswith('What is in the image? ASSISTANT:')
