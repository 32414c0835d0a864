"""Decoder families against transformers (fp32, CPU, tiny random weights): Mistral with a sliding window shorter
than the sequences, Llama-3.1 rope scaling (`llama3`) and Qwen2 (q/k/v biases, tied embeddings).

For each family one random HF LlavaForConditionalGeneration is built once (module fixture); its decoder is also
saved as the family's own ForCausalLM. Checked: import (both), CausalLM and LLaVA logits (<= 1e-4 relative to
the output scale), KV-cache greedy decoding == HF `generate`, export -> HF reload bit for bit, and for Qwen2 the
gradients of the training loss (biases included) against torch autograd.
"""
import json

import jax
import numpy as np
import pytest
import torch
import transformers

from llava_jax.convert import export_hf_llava, load_hf_llama, load_hf_llava
from llava_jax.convert.hf_config import text_from_hf
from llava_jax.generate import Sampler, pad_batch
from llava_jax.models import presets
from llava_jax.models.llama import sliding_window_mask
from llava_jax.train.step import next_token_loss

from test_models import positions_of, rel_err

TOL = 1e-4
WINDOW = 5
LLAMA3_ROPE = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
               'high_freq_factor': 4.0, 'original_max_position_embeddings': 64}  # 64: all three bands at head_dim 16
FAMILIES = {
    'mistral': (transformers.MistralConfig, dict(sliding_window=WINDOW)),
    'llama3': (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE)),
    'qwen2': (transformers.Qwen2Config, dict(tie_word_embeddings=True,
                                             rope_parameters={'rope_type': 'default', 'rope_theta': 1e6})),
}


def causal_lm_of(llava, text_config):
  """The family's ForCausalLM holding the LLaVA's decoder weights."""
  lm = transformers.AutoModelForCausalLM.from_config(text_config)
  sd = {f'model.{k}': v for k, v in llava.model.language_model.state_dict().items()}
  sd['lm_head.weight'] = llava.lm_head.weight
  missing, unexpected = lm.load_state_dict(sd, strict=False)
  assert not unexpected and set(missing) <= {'lm_head.weight'}
  return lm.eval()


@pytest.fixture(scope='module', params=list(FAMILIES))
def family(request, tiny, tmp_path_factory):
  name = request.param
  cls, extra = FAMILIES[name]
  text_config = cls(**dict(tiny.text, **extra))
  llava = tiny.hf_llava(seed=11, tie=text_config.tie_word_embeddings, text_config=text_config)
  root = tmp_path_factory.mktemp(name)
  llava.save_pretrained(root / 'llava')
  lm = causal_lm_of(llava, text_config)
  lm.save_pretrained(root / 'lm')
  ours, params = load_hf_llava(str(root / 'llava'))
  return dict(name=name, hf=llava, lm=lm, ours=ours, params=params, root=root, forward=jax.jit(ours.apply))


def batch(config, rng, image=(True, False, True), total=None):
  """Left-padded samples (image + text, text only, ...) longer than the sliding window."""
  n = config.num_image_tokens
  total = total or n + 10
  ids = np.zeros((len(image), total), np.int64)
  mask = np.zeros_like(ids)
  for i, has in enumerate(image):
    length = total - 3 * (i % 2)
    body = rng.integers(2, 100, length - 1 - (n if has else 0))
    ids[i, total - length:] = np.concatenate([[1], np.full(n if has else 0, 100), body])
    mask[i, total - length:] = 1
  pixels = rng.normal(size=(len(image), 3, 32, 32)).astype(np.float32)
  return ids, mask, pixels


def test_config_names_the_family(family):
  t, params = family['ours'].config.text, family['params']['language_model']
  want = {'mistral': ('mistral', WINDOW, 'default', False), 'llama3': ('llama', None, 'llama3', False),
          'qwen2': ('qwen2', None, 'default', True)}[family['name']]
  assert (t.model_type, t.sliding_window, t.rope_type, t.tie_word_embeddings) == want
  assert ('bias' in params['layers']['q_proj']) == (t.model_type == 'qwen2') == ('lm_head' not in params)
  if t.rope_type == 'llama3':
    assert (t.rope_factor, t.rope_original_max_position_embeddings, t.rope_theta) == (8.0, 64, 5e5)
  lm_config, lm_params = load_hf_llama(str(family['root'] / 'lm'))
  assert lm_config == t  # the CausalLM dir reads to the same decoder, weight for weight
  jax.tree.map(np.testing.assert_array_equal, lm_params, params)


@pytest.mark.parametrize('what', ['CausalLM', 'LLaVA'])
def test_logits_match_hf(family, what):
  """CausalLM: a text-only batch against the family's ForCausalLM; LLaVA: image + text-only samples against
  LlavaForConditionalGeneration. Both longer than the sliding window."""
  ours = family['ours']
  image = (False, False, False) if what == 'CausalLM' else (True, False, True)
  ids, mask, pixels = batch(ours.config, np.random.default_rng(0), image)
  kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions_of(mask)))
  with torch.no_grad():
    if what == 'CausalLM':
      ref = family['lm'](**kw).logits.numpy()
    else:  # HF takes pixel_values only for the samples that have image tokens
      ref = family['hf'](pixel_values=torch.from_numpy(pixels[(ids == 100).any(1)]), **kw).logits.numpy()
  out = np.asarray(family['forward']({'params': family['params']}, ids.astype(np.int32), pixels.transpose(0, 2, 3, 1),
                                     mask.astype(np.int32)))
  valid = mask.astype(bool)
  err = rel_err(out[valid], ref[valid])
  print(f'{family["name"]} {what} logits: rel err {err:.2e}')
  assert err <= TOL


def test_kv_cache_greedy_equals_hf_generate(family):
  """Prompts of 16 image tokens + text, 8 new tokens: the window (5) slides during prefill and decoding."""
  ours, rng = family['ours'], np.random.default_rng(2)
  n = ours.config.num_image_tokens
  prompts = [[1] + [100] * n + rng.integers(2, 100, 4).tolist(), [1] + [100] * n + rng.integers(2, 100, 2).tolist()]
  ids, mask = pad_batch(prompts, pad_token_id=0)
  pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  got = Sampler(ours, family['params'])(ids, mask, pixels.transpose(0, 2, 3, 1), max_new_tokens=8).tokens
  with torch.no_grad():
    ref = family['hf'].generate(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                attention_mask=torch.from_numpy(mask.astype(np.int64)),
                                pixel_values=torch.from_numpy(pixels), max_new_tokens=8, min_new_tokens=8,
                                do_sample=False, pad_token_id=0)[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(got, ref)
  assert len({tuple(r) for r in ref}) == 2 and len(set(ref.ravel())) >= 4  # not one repeated id


def test_export_reloads_in_hf_bit_for_bit(family, tmp_path):
  ours, hf = family['ours'], family['hf']
  export_hf_llava(str(tmp_path), ours.config, family['params'])
  reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
  want, got = hf.state_dict(), reloaded.state_dict()
  assert set(got) == set(want)
  for k in want:
    assert torch.equal(got[k], want[k]), k
  a, b = hf.config.text_config, reloaded.config.text_config
  assert (b.model_type, b.rope_parameters, getattr(b, 'sliding_window', None), b.tie_word_embeddings) == \
         (a.model_type, a.rope_parameters, getattr(a, 'sliding_window', None), a.tie_word_embeddings)
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['text_config']['model_type'] == ours.config.text.model_type


@pytest.mark.parametrize('family', ['qwen2'], indirect=True)
def test_qwen2_loss_gradients_match_torch(family):
  """Training parity: d(loss)/d(params) of the next-token loss against torch autograd, q/k/v biases included."""
  ours, hf = family['ours'], family['hf']
  ids, mask, pixels = batch(ours.config, np.random.default_rng(3), image=(True, True, True))
  labels = np.where(mask == 1, ids, -100)
  labels[(ids == 100) | (np.arange(ids.shape[1]) < ours.config.num_image_tokens + 4)] = -100
  hf.zero_grad()
  out = hf(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels), labels=torch.from_numpy(labels),
           attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(positions_of(mask)))
  out.loss.backward()

  def loss_fn(params):
    logits = ours.apply({'params': params}, ids.astype(np.int32), pixels.transpose(0, 2, 3, 1), mask.astype(np.int32))
    total, count = next_token_loss(logits, labels)
    return total / count

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(family['params'])
  ref_loss = float(out.loss.detach())
  assert abs(float(loss) - ref_loss) <= TOL * ref_loss
  lm, layers = grads['language_model'], grads['language_model']['layers']
  named = dict(hf.named_parameters())
  pairs = {
      'q_proj.bias': (layers['q_proj']['bias'][1].reshape(-1), 'model.language_model.layers.1.self_attn.q_proj.bias'),
      'k_proj.bias': (layers['k_proj']['bias'][0].reshape(-1), 'model.language_model.layers.0.self_attn.k_proj.bias'),
      'v_proj.weight': (np.asarray(layers['v_proj']['kernel'][0]).reshape(64, -1).T,
                        'model.language_model.layers.0.self_attn.v_proj.weight'),
      'embed (tied)': (lm['embed_tokens']['embedding'], 'model.language_model.embed_tokens.weight'),
      'projector': (np.asarray(grads['projector']['linear_2']['kernel']).T,
                    'model.multi_modal_projector.linear_2.weight'),
  }
  for what, (g, hf_name) in pairs.items():
    err = rel_err(g, named[hf_name].grad.numpy())
    print(f'qwen2 grad {what}: rel err {err:.2e}')
    assert err <= TOL, what


# ------------------------------------------------------------------------------------------ masks, presets, errors


def test_sliding_window_mask_keeps_the_last_w_positions():
  causal = np.tril(np.ones((6, 6), bool))
  m = np.asarray(sliding_window_mask(np.arange(6), np.arange(6), 3)) & causal
  np.testing.assert_array_equal(m.sum(1), [1, 2, 3, 3, 3, 3])
  np.testing.assert_array_equal(np.nonzero(m[5])[0], [3, 4, 5])
  # The cache form: queries at slots 8, 9 over 10 slots.
  m = np.asarray(sliding_window_mask(np.array([8, 9]), np.arange(10), 4))
  np.testing.assert_array_equal(m[:, :], np.arange(10)[None] > np.array([[4], [5]]))
  assert sliding_window_mask(np.arange(3), np.arange(3), None) is None


@pytest.mark.parametrize('preset,want', [
    ('llava_mistral_7b', ('mistral', 32000, 4096, 8, 14336, 'default')),
    ('llava_llama3_8b', ('llama', 128256, None, 8, 14336, 'default')),
    ('llava_llama31_8b', ('llama', 128256, None, 8, 14336, 'llama3')),
    ('llava_qwen2_0_5b', ('qwen2', 151936, None, 2, 4864, 'default')),
    ('llava_qwen2_1_5b', ('qwen2', 151936, None, 2, 8960, 'default')),
    ('llava_qwen2_7b', ('qwen2', 152064, None, 4, 18944, 'default')),
])
def test_family_presets(preset, want):
  c = presets.get_model_config(preset)
  t = c.text
  assert (t.model_type, presets.TEXT[presets.MODELS[preset]['text']].vocab_size, t.sliding_window, t.num_kv_heads,
          t.intermediate_size, t.rope_type) == want
  assert t.vocab_size % 64 == 0 and c.image_token_id < t.vocab_size
  assert t.tie_word_embeddings == (preset in ('llava_qwen2_0_5b', 'llava_qwen2_1_5b'))


def test_unsupported_rope_scaling_is_an_error_naming_file_and_key(tmp_path):
  hc = transformers.LlamaConfig(**dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, rope_parameters={'rope_type': 'linear', 'factor': 2.0,
                                                                               'rope_theta': 1e4}))
  hc.save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=rf"{tmp_path}: config.json key rope_scaling: rope_type 'linear' is not "
                                       r"supported; supported: 'default' .* and 'llama3'"):
    load_hf_llama(str(tmp_path))
  qwen = transformers.Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=0)
  with pytest.raises(ValueError, match='x: config.json key use_sliding_window=true is not supported'):
    text_from_hf(qwen, 'x')
