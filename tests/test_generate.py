"""Generation: KV-cache decoding equals recomputation, left-padded batches equal single samples, EOS, stop strings,
streaming, sampling filters, determinism and mesh sharding."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from llava_jax.generate import GenerateOutput, Sampler, SamplingParams, generate_uncached, pad_batch, sample_logits
from llava_jax.models.config import LlamaConfig, LlavaConfig, VisionConfig
from llava_jax.models.llava import Llava

from conftest import random_params

CONFIG = LlavaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, patch_size=4, image_size=16),
    text=LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
    image_token_id=127)
MAX_NEW = 24


class PairTokenizer:
  """Each id decodes to two letters, so a stop string can span a token boundary."""

  def decode(self, ids, skip_special_tokens=True):
    return ''.join(chr(97 + i % 26) + chr(97 + (i // 26) % 26) for i in ids)


def make_inputs():
  params = random_params(CONFIG, seed=4)
  rng = np.random.default_rng(0)
  n = CONFIG.num_image_tokens
  prompts = [[1] + [127] * n + rng.integers(3, 120, 5).tolist(),
             [1] + rng.integers(3, 120, 9).tolist(),          # text-only sample in an image batch
             [1] + [127] * n + rng.integers(3, 120, 2).tolist()]
  pixels = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  return params, prompts, pixels


@pytest.fixture(scope='module')
def setup():
  params, prompts, pixels = make_inputs()
  model = Llava(CONFIG)
  ids, mask = pad_batch(prompts, pad_token_id=0)
  sampler = Sampler(model, params)
  greedy = sampler(ids, mask, pixels, max_new_tokens=MAX_NEW)
  return dict(model=model, params=params, prompts=prompts, pixels=pixels, ids=ids, mask=mask, sampler=sampler,
              greedy=greedy)


def test_pad_batch_left_pads():
  ids, mask = pad_batch([[5, 6], [7, 8, 9]], pad_token_id=0, multiple=4)
  np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [0, 7, 8, 9]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1]])


def test_cached_equals_uncached(setup):
  s = setup
  ref = generate_uncached(s['model'], s['params'], s['ids'], s['mask'], s['pixels'], max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(s['greedy'].tokens, ref)
  assert s['greedy'].finish_reasons == ['length'] * 3
  np.testing.assert_array_equal(s['greedy'].lengths, [MAX_NEW] * 3)
  assert len({tuple(r) for r in ref}) == 3 and all(len(set(r)) > 8 for r in ref)  # varied, not one repeated id


def test_each_image_belongs_to_its_sample(setup):
  s = setup
  swapped = s['sampler'](s['ids'], s['mask'], s['pixels'][::-1].copy(), max_new_tokens=MAX_NEW)
  changed = (swapped.tokens != s['greedy'].tokens).any(axis=1)
  np.testing.assert_array_equal(changed, [True, False, True])  # sample 1 has no image tokens


def test_batched_left_padded_equals_single(setup):
  s = setup
  for i, prompt in enumerate(s['prompts']):
    pixels = s['pixels'][i:i + 1] if CONFIG.image_token_id in prompt else None
    single = s['sampler'](np.array([prompt]), None, pixels, max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(single.tokens[0], s['greedy'].tokens[i])


def test_eos_ends_each_sample(setup):
  s = setup
  full = s['greedy'].tokens
  eos = [int(full[1, 6]), int(full[2, 9])]
  first = [int(np.argmax(np.isin(r, eos))) if np.isin(r, eos).any() else MAX_NEW for r in full]
  assert first[1] <= 6 and first[2] <= 9
  out = s['sampler'](s['ids'], s['mask'], s['pixels'], max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0)
  assert out.finish_reasons == ['eos' if n < MAX_NEW else 'length' for n in first]
  for i in range(3):
    n = first[i]
    assert out.lengths[i] == n
    np.testing.assert_array_equal(out.tokens[i, :n], full[i, :n])
    assert (out.tokens[i, n:] == 0).all()
  ref = generate_uncached(s['model'], s['params'], s['ids'], s['mask'], s['pixels'], max_new_tokens=MAX_NEW,
                          eos_token_id=eos)
  for i in range(3):  # the reference keeps the EOS token itself, then pads
    np.testing.assert_array_equal(ref[i, :first[i]], out.tokens[i, :first[i]])


@pytest.mark.parametrize('chunk_size', [1, 5, None])
def test_stop_strings_and_stream(setup, chunk_size):
  s = setup
  tok = PairTokenizer()
  full_text = [tok.decode(r) for r in s['greedy'].tokens]
  stop = full_text[0][5:8]  # spans the boundary of tokens 2 and 3 of sample 0
  assert full_text[0].find(stop) == 5
  pieces = {0: [], 1: [], 2: []}
  out = s['sampler'](s['ids'], s['mask'], s['pixels'], max_new_tokens=MAX_NEW, tokenizer=tok,
                     stop_strings=[stop, 'zzzz'], stream=lambda i, d: pieces[i].append(d), chunk_size=chunk_size)
  assert isinstance(out, GenerateOutput)
  for i in range(3):
    cut = full_text[i].find(stop)
    if cut < 0:
      assert out.finish_reasons[i] == 'length' and out.texts[i] == full_text[i]
      continue
    n = next(n for n in range(1, MAX_NEW + 1) if stop in tok.decode(s['greedy'].tokens[i, :n]))
    assert out.finish_reasons[i] == 'stop'
    assert out.texts[i] == full_text[i][:cut]
    assert out.lengths[i] == n
    np.testing.assert_array_equal(out.tokens[i, :n], s['greedy'].tokens[i, :n])
  assert out.lengths[0] == 4 and out.texts[0] == full_text[0][:5]
  for i in range(3):
    assert ''.join(pieces[i]) == out.texts[i]
  assert all(stop not in p for p in pieces[0])


def test_sampling_deterministic_for_seed(setup):
  s = setup
  kw = dict(max_new_tokens=MAX_NEW, sampling=SamplingParams(temperature=1.0, top_k=20, top_p=0.9))
  a = s['sampler'](s['ids'], s['mask'], s['pixels'], seed=3, **kw)
  b = s['sampler'](s['ids'], s['mask'], s['pixels'], seed=3, **kw)
  c = s['sampler'](s['ids'], s['mask'], s['pixels'], seed=4, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any() and (a.tokens != s['greedy'].tokens).any()
  top1 = s['sampler'](s['ids'], s['mask'], s['pixels'], max_new_tokens=MAX_NEW, seed=5,
                      sampling=SamplingParams(temperature=0.7, top_k=1))
  np.testing.assert_array_equal(top1.tokens, s['greedy'].tokens)


def test_sample_logits_filters():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = np.tile(np.log(probs), (20000, 1)).astype(np.float32)
  key = jax.random.key(0)

  def freq(**kw):
    toks = np.asarray(sample_logits(logits, key, SamplingParams(temperature=1.0, **kw)))
    return np.bincount(toks, minlength=4) / len(toks)

  np.testing.assert_allclose(freq(), probs, atol=0.015)
  np.testing.assert_allclose(freq(top_k=2), [0.625, 0.375, 0, 0], atol=0.015)
  np.testing.assert_allclose(freq(top_p=0.8), [0.625, 0.375, 0, 0], atol=0.015)    # 0.5+0.3 reaches 0.8
  np.testing.assert_allclose(freq(top_p=0.81), [0.5, 0.3, 0.15, 0] / np.float64(0.95), atol=0.015)
  np.testing.assert_allclose(freq(top_p=0.1), [1, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(sample_logits(logits[:2], key, SamplingParams())), [0, 0])


def test_input_errors(setup):
  s = setup
  ids, mask = s['ids'][:, ::-1], s['mask'][:, ::-1]  # right padding
  with pytest.raises(ValueError, match='LEFT-padded'):
    s['sampler'](ids, mask, s['pixels'], max_new_tokens=4)
  with pytest.raises(ValueError, match='image tokens'):
    s['sampler'](np.array([[1, 127, 5]]), None, s['pixels'][:1], max_new_tokens=4)
  with pytest.raises(ValueError, match='need a tokenizer'):
    s['sampler'](s['ids'], s['mask'], s['pixels'], max_new_tokens=4, stop_strings=['x'])


def test_mesh_sharded_equals_single_device(setup):
  """4 CPU devices as a (data 2, fsdp 1, tensor 2) mesh; params sharded by the logical rules."""
  script = textwrap.dedent(f"""
      import os
      os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
      from llava_jax import sharding
      from llava_jax.generate import Sampler, pad_batch
      from llava_jax.models.llava import Llava
      from tests.test_generate import CONFIG, make_inputs
      params, prompts, pixels = make_inputs()
      ids, mask = pad_batch(prompts[:2], pad_token_id=0)
      sampler = Sampler(Llava(CONFIG), params, mesh=sharding.make_mesh((2, 1, 2)))
      assert tuple(sampler.params['language_model']['lm_head']['kernel'].sharding.spec) == (None, 'tensor')
      print(sampler(ids, mask, pixels[:2], max_new_tokens={MAX_NEW}).tokens.tolist())
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=root,
                       env={**os.environ, 'PYTHONPATH': os.pathsep.join([root, os.path.join(root, 'tests')])})
  assert out.returncode == 0, out.stderr[-2000:]
  np.testing.assert_array_equal(eval(out.stdout.strip().splitlines()[-1]), setup['greedy'].tokens[:2])


class BytesTokenizer:
  """id 1 -> 'a', 2 -> '#', 3 + 4 -> 'é' (3 alone is an incomplete UTF-8 sequence: U+FFFD)."""

  def decode(self, ids, skip_special_tokens=True):
    text, i = '', 0
    while i < len(ids):
      if ids[i] == 3:
        text += 'é' if i + 1 < len(ids) and ids[i + 1] == 4 else '\ufffd'
        i += 2
        continue
      text += {1: 'a', 2: '#'}[ids[i]]
      i += 1
    return text


def test_text_stream_holds_back_partial_text():
  from llava_jax.generate import TextStream
  t = TextStream(BytesTokenizer(), ['###'])
  assert [t.push([1]), t.push([3]), t.push([4]), t.push([2]), t.push([2]), t.push([1])] == \
      ['a', '', 'é', '', '', '##a']  # U+FFFD and a possible '###' prefix wait
  assert not t.stopped
  assert [t.push([2]), t.push([2]), t.push([2, 1])] == ['', '', ''] and t.stopped
  assert t.text == 'aé##a' and t.ids == [1, 3, 4, 2, 2, 1, 2, 2, 2] and t.flush() == ''


def test_last_logits_only_equals_full_logits(setup):
  """The prefill's LM head on the last position only (the serving engine and Sampler use it)."""
  model, params = setup['model'], setup['params']
  ids, mask = setup['ids'], setup['mask']
  full = model.apply({'params': params}, ids, setup['pixels'], attention_mask=mask)
  last = model.apply({'params': params}, ids, setup['pixels'], attention_mask=mask, last_logits_only=True)
  assert last.shape == (ids.shape[0], 1, full.shape[-1])
  np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), rtol=1e-5, atol=1e-5)
