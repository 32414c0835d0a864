"""Parity of the Flax models with transformers' PyTorch models (fp32, CPU, tiny random weights).

Errors are max |ours - HF| / max |HF| ("relative to the output scale"); the bound is 1e-4 unless stated.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from llava_jax.convert import load_hf_clip, load_hf_llama, load_hf_llava
from llava_jax.models import Llava, check_image_tokens
from llava_jax.models.clip import CLIPVisionTower
from llava_jax.models.llama import LlamaForCausalLM, init_cache

TOL = 1e-4


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def positions_of(mask):
  """HF position ids for a padded batch, as HF generation derives them (and our model does)."""
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


# ------------------------------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope='module')
def clip(tiny, tmp_path_factory):
  torch.manual_seed(0)
  model = tiny.randomize_(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**tiny.vision)), seed=1)
  path = str(tmp_path_factory.mktemp('clip'))
  model.save_pretrained(path)
  pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    hidden = model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states
  return path, pixels, hidden[-2].numpy()


@pytest.mark.parametrize('select', ['patch', 'cls_patch'])
def test_clip_selected_layer_matches_hf(clip, select):
  path, pixels, ref = clip
  config, params = load_hf_clip(path, feature_select=select)
  assert config.num_layers_used == 3 and params['unused_layers']['fc1']['kernel'].shape[0] == 1
  out = jax.jit(CLIPVisionTower(config).apply)({'params': params}, pixels.transpose(0, 2, 3, 1))
  ref = ref[:, 1:] if select == 'patch' else ref
  assert out.shape == ref.shape == (2, config.num_image_tokens, 32)
  err = rel_err(out, ref)
  print(f'CLIP {select}: rel err {err:.2e}')
  assert err <= TOL


# ------------------------------------------------------------------------------------------------------ LLaMA


@pytest.fixture(scope='module')
def llama(tiny, tmp_path_factory):
  """GQA (4 heads / 2 kv heads), tied embeddings, rope_theta 5e5 and head_dim 32 != hidden/heads."""
  torch.manual_seed(0)
  cfg = dict(tiny.text, tie_word_embeddings=True, head_dim=32,
             rope_parameters={'rope_type': 'default', 'rope_theta': 500000.0})
  model = tiny.randomize_(transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)), seed=2)
  path = str(tmp_path_factory.mktemp('llama'))
  model.save_pretrained(path)
  config, params = load_hf_llama(path)
  return model, config, params


def text_forward(config):
  def fwd(params, ids, mask):
    return LlamaForCausalLM(config).apply({'params': params}, ids, mask, method=lambda m, i, a: m(m.embed(i), a))
  return jax.jit(fwd)


def padded_batch(rng, lengths, total, vocab=128):
  ids = np.zeros((len(lengths), total), np.int64)
  mask = np.zeros((len(lengths), total), np.int64)
  for i, n in enumerate(lengths):  # left padding, as for generation
    ids[i, total - n:] = rng.integers(1, vocab, n)
    mask[i, total - n:] = 1
  return ids, mask


def test_llama_logits_match_hf(llama):
  model, config, params = llama
  assert config.tie_word_embeddings and config.num_kv_heads == 2 and config.rope_theta == 5e5
  assert config.dim_per_head == 32 and 'lm_head' not in params
  ids, mask = padded_batch(np.random.default_rng(0), [12, 7], 12)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions_of(mask))).logits.numpy()
  out = np.asarray(text_forward(config)(params, ids.astype(np.int32), mask.astype(np.int32)))
  valid = mask.astype(bool)
  err = rel_err(out[valid], ref[valid])
  print(f'LLaMA logits: rel err {err:.2e}')
  assert err <= TOL


def test_kv_cache_decoding_equals_full_forward(llama):
  """Prefill a left-padded prompt, then one token per step: every step's logits equal the full forward's."""
  model, config, params = llama
  rng = np.random.default_rng(1)
  prompt, prompt_mask = padded_batch(rng, [9, 4, 6], 9)
  steps = rng.integers(1, 128, (3, 5))
  full_ids = np.concatenate([prompt, steps], 1).astype(np.int32)
  full_mask = np.concatenate([prompt_mask, np.ones_like(steps)], 1).astype(np.int32)
  full = np.asarray(text_forward(config)(params, full_ids, full_mask))

  @jax.jit
  def decode(params, ids, mask, cache):
    return LlamaForCausalLM(config).apply({'params': params}, ids, mask, cache,
                                          method=lambda m, i, a, c: m(m.embed(i), a, c))

  cache = init_cache(config, 3, full_ids.shape[1])
  logits, cache = decode(params, full_ids[:, :9], full_mask[:, :9], cache)
  got = [np.asarray(logits)]
  for t in range(steps.shape[1]):
    logits, cache = decode(params, full_ids[:, 9 + t:10 + t], full_mask[:, 9 + t:10 + t], cache)
    got.append(np.asarray(logits))
  got = np.concatenate(got, 1)
  valid = full_mask.astype(bool)
  err = rel_err(got[valid], full[valid])
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(full_ids.astype(np.int64)), attention_mask=torch.from_numpy(full_mask),
                position_ids=torch.from_numpy(positions_of(full_mask))).logits.numpy()
  err_hf = rel_err(got[valid], ref[valid])
  print(f'KV cache vs full forward: rel err {err:.2e}; vs HF {err_hf:.2e}')
  assert err <= 1e-5 and err_hf <= TOL
  assert int(cache['index']) == full_ids.shape[1]
  np.testing.assert_array_equal(np.asarray(cache['next_pos']), full_mask.sum(1))


# ------------------------------------------------------------------------------------------------------ LLaVA


def llava_batch(n_image_tokens, rng):
  """Three samples: image + text, text only (left-padded), image + text. Labels supervise the text answers."""
  n, total = n_image_tokens, n_image_tokens + 10
  ids = np.zeros((3, total), np.int64)
  mask = np.ones((3, total), np.int64)
  for i in (0, 2):
    ids[i] = np.concatenate([[1], np.full(n, 100), rng.integers(2, 100, total - n - 1)])
  ids[1, 4:] = rng.integers(2, 100, total - 4)
  mask[1, :4] = 0
  labels = np.where(mask == 1, ids, -100)
  labels[ids == 100] = -100
  labels[:, :n + 4] = -100  # the prompt is not supervised
  labels[1, :8] = -100
  pixels = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
  return ids, mask, labels, pixels


def masked_loss(logits, labels):
  """Mean next-token cross entropy over supervised positions (label != -100), like HF's causal LM loss."""
  logits, targets = jnp.asarray(logits, jnp.float32)[:, :-1], jnp.asarray(labels)[:, 1:]
  keep = targets != -100
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, targets, 0))
  return float((ce * keep).sum() / keep.sum())


@pytest.fixture(scope='module', params=[('linear', 'full'), ('gelu', 'default')], ids=['linear', 'mlp2x_gelu'])
def llava(request, tiny, tmp_path_factory):
  act, select = request.param
  model = tiny.hf_llava(projector_act=act, select=select, seed=3)
  path = str(tmp_path_factory.mktemp(f'llava_{act}'))
  model.save_pretrained(path)
  ours, params = load_hf_llava(path)
  return model, ours, params, jax.jit(ours.apply)  # one compiled fp32 forward per fixture


def test_llava_logits_and_loss_match_hf(llava):
  model, ours, params, forward = llava
  config = ours.config
  assert config.projector == ('linear' if model.config.projector_hidden_act == 'linear' else 'mlp2x_gelu')
  ids, mask, labels, pixels = llava_batch(config.num_image_tokens, np.random.default_rng(2))
  has_image = (ids == 100).any(1)
  with torch.no_grad():  # HF takes pixel_values only for the samples that have image tokens
    out = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels[has_image]),
                attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(positions_of(mask)),
                labels=torch.from_numpy(labels))
  ref, ref_loss = out.logits.numpy(), float(out.loss)
  pix = np.where(has_image[:, None, None, None], pixels, 0).transpose(0, 2, 3, 1)
  logits = np.asarray(forward({'params': params}, ids.astype(np.int32), pix, mask.astype(np.int32)))
  valid = mask.astype(bool)
  err = rel_err(logits[valid], ref[valid])
  loss = masked_loss(logits, labels)
  print(f'LLaVA {config.projector}/{config.vision.feature_select}: logits rel err {err:.2e}, '
        f'loss {loss:.6f} vs HF {ref_loss:.6f}')
  assert err <= TOL
  assert abs(loss - ref_loss) <= TOL * abs(ref_loss)


def test_bf16_compute_close_to_fp32(llava):
  _, ours, params, forward = llava
  ids, mask, _, pixels = llava_batch(ours.config.num_image_tokens, np.random.default_rng(3))
  pix = pixels.transpose(0, 2, 3, 1)
  pix[1] = 0
  args = (ids.astype(np.int32), pix, mask.astype(np.int32))
  fp32 = np.asarray(forward({'params': params}, *args))
  bf16_model = Llava(ours.config.replace(dtype='bfloat16'))
  bf16 = jax.jit(bf16_model.apply)({'params': params}, *args)
  assert bf16.dtype == jnp.bfloat16
  valid = mask.astype(bool)
  err = rel_err(np.asarray(bf16, np.float32)[valid], fp32[valid])
  print(f'bf16 vs fp32 ({ours.config.projector}): rel err {err:.2e}')
  assert err <= 2e-2


def test_wrong_image_token_count_is_an_error(llava):
  _, ours, params, _ = llava
  n = ours.config.num_image_tokens
  ids = np.array([[1] + [100] * n + [5, 6], [1] + [100] * (n - 1) + [5, 6, 7]], np.int32)
  pix = np.zeros((2, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match=rf'samples \[1\] have \[{n - 1}\] image tokens .* exactly {n}'):
    ours.apply({'params': params}, ids, pix)
  with pytest.raises(ValueError, match='pixel_values is None'):
    check_image_tokens(ids[:1], ours.config, has_pixels=False)
  assert check_image_tokens(ids[:1], ours.config).tolist() == [n]
