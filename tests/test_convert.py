"""HF weight import / export: every layout we read gives the same params, bad checkpoints fail loudly, and
HF -> import -> export -> transformers reloads with no missing keys and the same logits."""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from llava_jax.convert import (CheckpointMismatchError, export_hf_llava, load_hf_clip, load_hf_llama, load_hf_llava)
from llava_jax.convert.__main__ import main as cli
from llava_jax.convert.hf_config import llava_from_hf
from llava_jax.convert.safetensors_io import SAFE_INDEX
from llava_jax.model_dir import load_model
from llava_jax.models import LlamaConfig, Llava, LlavaConfig, VisionConfig, abstract_params
from llava_jax.models.presets import get_model_config

from conftest import word_tokenizer

HUB_PREFIXES = ('vision_tower.vision_model.', 'language_model.model.', 'language_model.lm_head.',
                'multi_modal_projector.')


def assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def state_dict(model):
  return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def hub_layout(sd):
  """The transformers 4.x hub layout of a 5.x-saved LLaVA state dict (vision tower under `vision_model.`)."""
  out = {}
  for k, v in sd.items():
    if k.startswith('model.vision_tower.'):
      k = 'vision_tower.vision_model.' + k[len('model.vision_tower.'):]
    elif k.startswith('model.language_model.'):
      k = 'language_model.model.' + k[len('model.language_model.'):]
    elif k.startswith('model.multi_modal_projector.'):
      k = k[len('model.'):]
    elif k.startswith('lm_head.'):
      k = 'language_model.' + k
    out[k] = v
  return out


def write_dir(path, config, tensors, fmt='safetensors', shards=1):
  os.makedirs(path, exist_ok=True)
  config.save_pretrained(path)
  names = sorted(tensors)
  groups = [names[i::shards] for i in range(shards)]
  ext = 'safetensors' if fmt == 'safetensors' else 'bin'
  stem = 'model' if fmt == 'safetensors' else 'pytorch_model'
  files = [f'{stem}.{ext}'] if shards == 1 else [f'{stem}-{i + 1:05d}-of-{shards:05d}.{ext}' for i in range(shards)]
  for f, group in zip(files, groups):
    part = {k: tensors[k] for k in group}
    if fmt == 'safetensors':
      save_file(part, os.path.join(path, f), metadata={'format': 'pt'})
    else:
      torch.save(part, os.path.join(path, f))
  if shards > 1:
    index = SAFE_INDEX if fmt == 'safetensors' else 'pytorch_model.bin.index.json'
    with open(os.path.join(path, index), 'w') as fh:
      json.dump({'metadata': {}, 'weight_map': {k: f for f, g in zip(files, groups) for k in g}}, fh)
  return path


def safetensors_keys(path):
  with open(path, 'rb') as f:
    return set(json.loads(f.read(int.from_bytes(f.read(8), 'little')))) - {'__metadata__'}


def numbered_tokenizer(n_words, with_image):
  """A WordLevel fast tokenizer 't0'..'t{n-1}' (+ '<image>' as the next id)."""
  return word_tokenizer([f't{i}' for i in range(n_words)], specials=('t0', 't1', 't2', 't3'), image_token=with_image)


def hf_logits(model, ids, pixels):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)).logits.numpy()


def sample_inputs(config_or_n, rng):
  n = config_or_n if isinstance(config_or_n, int) else config_or_n.num_image_tokens
  ids = np.array([[1] + [100] * n + rng.integers(2, 100, 6).tolist()], np.int64)
  return ids, rng.normal(size=(1, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope='module')
def ref(tiny, tmp_path_factory):
  """A random HF LLaVA saved by transformers 5.24 (its own layout) with a tokenizer, and its import."""
  model = tiny.hf_llava(seed=5)
  path = str(tmp_path_factory.mktemp('hf5'))
  model.save_pretrained(path)
  numbered_tokenizer(100, True).save_pretrained(path)
  ours, params = load_hf_llava(path)
  return model, path, ours, params


# ------------------------------------------------------------------------------------------------------ layouts


def test_transformers5_save_layout_is_what_we_read(ref):
  """5.24 writes language_model.model.* but drops vision_model. from the vision tower (LLAVA.md §9)."""
  _, path, _, _ = ref
  keys = safetensors_keys(os.path.join(path, 'model.safetensors'))
  assert any(k.startswith('vision_tower.encoder.') for k in keys)
  assert not any(k.startswith('vision_tower.vision_model.') for k in keys)
  assert 'language_model.lm_head.weight' in keys and any(k.startswith('language_model.model.') for k in keys)


@pytest.mark.parametrize('layout', ['hub_4x', 'module_names_5x', 'sharded_safetensors', 'sharded_bin', 'bf16'])
def test_every_layout_imports_the_same_params(ref, layout, tmp_path):
  model, _, ours, params = ref
  sd = state_dict(model)  # 5.x module names: model.vision_tower.*, model.language_model.*, lm_head.weight
  if layout == 'hub_4x':
    path = write_dir(tmp_path, model.config, hub_layout(sd))
  elif layout == 'module_names_5x':
    path = write_dir(tmp_path, model.config, sd)
  elif layout == 'sharded_safetensors':
    path = write_dir(tmp_path, model.config, hub_layout(sd), shards=3)
  elif layout == 'sharded_bin':
    path = write_dir(tmp_path, model.config, hub_layout(sd), fmt='bin', shards=2)
  else:
    path = write_dir(tmp_path, model.config, {k: v.to(torch.bfloat16) for k, v in hub_layout(sd).items()})
  got_model, got = load_hf_llava(str(path))
  if layout == 'bf16':
    assert got_model.config == ours.config.replace(param_dtype='bfloat16')
    params = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params)
  else:
    assert got_model.config == ours.config
  assert_trees_equal(got, params)


@pytest.fixture(scope='module')
def clip_model(tiny):
  torch.manual_seed(0)
  return tiny.randomize_(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**tiny.vision)), seed=6)


@pytest.mark.parametrize('layout', ['clip_model_full', 'vision_4x', 'vision_5x'])
def test_clip_layouts(clip_model, tiny, layout, tmp_path):
  sd = state_dict(clip_model)  # 5.x CLIPVisionModel names (no vision_model. prefix)
  if layout == 'clip_model_full':  # openai/clip-vit-large-patch14: CLIPModel with the text tower too
    full = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=tiny.vision, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, vocab_size=50, bos_token_id=0,
                                                    eos_token_id=1, pad_token_id=1)))
    full.vision_model.load_state_dict(sd)
    full.save_pretrained(tmp_path)
  elif layout == 'vision_4x':
    write_dir(tmp_path, clip_model.config, {'vision_model.' + k: v for k, v in sd.items()})
  else:
    clip_model.save_pretrained(tmp_path)
  config, params = load_hf_clip(str(tmp_path), feature_select='cls_patch')
  assert (config.num_layers, config.num_layers_used, config.feature_select) == (4, 3, 'cls_patch')
  np.testing.assert_array_equal(params['patch_embedding']['kernel'],
                                sd['embeddings.patch_embedding.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params['unused_layers']['fc2']['kernel'][0], sd['encoder.layers.3.mlp.fc2.weight'].T)
  q = sd['encoder.layers.1.self_attn.q_proj.weight'].numpy()
  np.testing.assert_array_equal(params['layers']['q_proj']['kernel'][1], q.T.reshape(32, 4, 8))
  np.testing.assert_array_equal(params['post_layernorm']['scale'], sd['post_layernorm.weight'])


def test_llama_dir_import_equals_llava_language_model(ref, tmp_path):
  model, _, ours, params = ref
  lm = transformers.LlamaForCausalLM(model.config.text_config)
  lm.model.load_state_dict(model.model.language_model.state_dict())
  lm.lm_head.load_state_dict(model.lm_head.state_dict())
  lm.save_pretrained(tmp_path)
  config, got = load_hf_llama(str(tmp_path))
  assert config == ours.config.text
  assert_trees_equal(got, params['language_model'])


def test_llava_hf_config_maps_to_the_preset(tmp_path):
  """llava-hf/llava-1.5-7b-hf's config.json lists only non-default fields; HF's defaults fill the rest."""
  raw = {'architectures': ['LlavaForConditionalGeneration'], 'ignore_index': -100, 'image_token_index': 32000,
         'model_type': 'llava', 'pad_token_id': 32001, 'projector_hidden_act': 'gelu',
         'text_config': {'_name_or_path': 'lmsys/vicuna-7b-v1.5', 'architectures': ['LlamaForCausalLM'],
                         'max_position_embeddings': 4096, 'model_type': 'llama', 'rms_norm_eps': 1e-05,
                         'torch_dtype': 'float16', 'vocab_size': 32064},
         'tie_word_embeddings': False, 'torch_dtype': 'float16', 'transformers_version': '4.36.0.dev0',
         'vision_config': {'hidden_size': 1024, 'image_size': 336, 'intermediate_size': 4096,
                           'model_type': 'clip_vision_model', 'num_attention_heads': 16, 'num_hidden_layers': 24,
                           'patch_size': 14, 'projection_dim': 768, 'vocab_size': 32000},
         'vision_feature_layer': -2, 'vision_feature_select_strategy': 'default', 'vocab_size': 32064}
  (tmp_path / 'config.json').write_text(json.dumps(raw))
  config, fold = llava_from_hf(transformers.LlavaConfig.from_pretrained(tmp_path), 'llava-hf', 'float16')
  assert not fold and config == get_model_config('llava15_7b', param_dtype='float16')
  assert config.num_image_tokens == 576


# ------------------------------------------------------------------------------------------- original release


def original_release_dir(path, model, clip_dir, projector='mlp2x_gelu', with_projector=True, tokenizer=None):
  """haotian-liu/LLaVA layout: a LLaMA checkpoint with model.mm_projector.* and mm_* config keys."""
  sd = {k: v for k, v in hub_layout(state_dict(model)).items() if k.startswith('language_model.')}
  tensors = {k[len('language_model.'):]: v for k, v in sd.items()}
  if with_projector:
    proj = model.model.multi_modal_projector
    if projector == 'mlp2x_gelu':
      tensors.update({'model.mm_projector.0.weight': proj.linear_1.weight, 'model.mm_projector.0.bias':
                      proj.linear_1.bias, 'model.mm_projector.2.weight': proj.linear_2.weight,
                      'model.mm_projector.2.bias': proj.linear_2.bias})
  tensors = {k: v.detach().clone() for k, v in tensors.items()}
  write_dir(path, model.config.text_config, tensors, fmt='bin', shards=2)
  with open(os.path.join(path, 'config.json')) as f:
    raw = json.load(f)
  if with_projector:
    raw.update(model_type='llava', mm_vision_tower=str(clip_dir), mm_hidden_size=32, mm_vision_select_layer=-2,
               mm_vision_select_feature='patch', mm_projector_type=projector, mm_use_im_start_end=False)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(raw, f)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
  return str(path)


@pytest.fixture(scope='module')
def clip_dir_of_ref(ref, tmp_path_factory):
  """The CLIP checkpoint of the reference LLaVA, saved as a 4.x CLIPVisionModel (vision_model.*)."""
  model = ref[0]
  path = tmp_path_factory.mktemp('clip_of_ref')
  sd = {'vision_model.' + k: v for k, v in state_dict(model.model.vision_tower).items()}
  write_dir(path, model.config.vision_config, sd)
  return str(path)


def test_original_release_matches_hf(ref, clip_dir_of_ref, tmp_path):
  model, _, ours, params = ref
  path = original_release_dir(tmp_path / 'orig', model, clip_dir_of_ref)
  got_model, got = load_hf_llava(path, image_token_id=100)  # CLIP found through mm_vision_tower
  assert got_model.config == ours.config
  assert_trees_equal(got, params)
  # Default: the release has no in-vocab image token; id 128 is appended and the vocab padded to 192.
  grown_model, grown = load_hf_llava(path)
  assert (grown_model.config.image_token_id, grown_model.config.text.vocab_size) == (128, 192)
  emb, ref_emb = grown['language_model']['embed_tokens']['embedding'], params['language_model']['embed_tokens']['embedding']
  np.testing.assert_array_equal(emb[:128], ref_emb)
  np.testing.assert_allclose(emb[128:], np.broadcast_to(ref_emb.mean(0), (64, 64)), rtol=1e-6)
  np.testing.assert_array_equal(grown['language_model']['lm_head']['kernel'][:, :128],
                                params['language_model']['lm_head']['kernel'])


def test_stage1_projector_bin_with_linear_projector_matches_hf(tiny, tmp_path):
  """Vicuna dir + a separate mm_projector.bin (stage-1 output, linear) + CLIP: same logits as HF's equivalent."""
  model = tiny.hf_llava(projector_act='linear', seed=7)
  proj = model.model.multi_modal_projector
  with torch.no_grad():  # HF holds a linear projector as linear_2(linear_1(x)); make linear_2 the identity
    proj.linear_2.weight.copy_(torch.eye(64))
    proj.linear_2.bias.zero_()
  clip_dir = tmp_path / 'clip'
  model.model.vision_tower.save_pretrained(clip_dir)  # 5.x CLIPVisionModel layout
  llm = original_release_dir(tmp_path / 'vicuna', model, clip_dir, with_projector=False)
  torch.save({'model.mm_projector.weight': proj.linear_1.weight.detach().clone(),
              'model.mm_projector.bias': proj.linear_1.bias.detach().clone()}, tmp_path / 'mm_projector.bin')
  ours, params = load_hf_llava(llm, vision_tower=str(clip_dir), mm_projector=str(tmp_path / 'mm_projector.bin'),
                               image_token_id=100)
  assert ours.config.projector == 'linear' and set(params['projector']) == {'linear_1'}
  ids, pixels = sample_inputs(ours.config, np.random.default_rng(0))
  logits = np.asarray(jax.jit(ours.apply)({'params': params}, ids.astype(np.int32), pixels.transpose(0, 2, 3, 1)))
  want = hf_logits(model, ids, pixels)
  assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()


# ------------------------------------------------------------------------------------------------- bad input


def test_missing_unexpected_misshaped_keys_listed_together(ref, tmp_path):
  model, _, _, _ = ref
  sd = hub_layout(state_dict(model))
  del sd['language_model.model.layers.1.mlp.up_proj.weight']
  sd['multi_modal_projector.linear_3.weight'] = torch.zeros(2, 2)
  sd['vision_tower.vision_model.encoder.layers.2.self_attn.q_proj.weight'] = torch.zeros(32, 16)
  path = write_dir(tmp_path, model.config, sd)
  with pytest.raises(CheckpointMismatchError) as e:
    load_hf_llava(str(path))
  msg = str(e.value)
  assert 'missing (1): language_model.model.layers.1.mlp.up_proj.weight' in msg
  assert 'unexpected (1): multi_modal_projector.linear_3.weight' in msg
  assert ('mis-shaped (1): vision_tower.vision_model.encoder.layers.2.self_attn.q_proj.weight: checkpoint '
          '(32, 16), expected (32, 32)') in msg


def test_truncated_safetensors_names_the_file(ref, tmp_path):
  model, _, _, _ = ref
  path = write_dir(tmp_path, model.config, hub_layout(state_dict(model)))
  weights = os.path.join(path, 'model.safetensors')
  with open(weights, 'r+b') as f:
    f.truncate(os.path.getsize(weights) - 4)
  with pytest.raises(ValueError, match=f'{weights}: not a readable safetensors file'):
    load_hf_llava(str(path))


def test_config_the_port_cannot_run_is_an_error(ref, tmp_path):
  model, _, _, _ = ref
  sd = hub_layout(state_dict(model))
  config = model.config.__class__.from_dict(model.config.to_dict())
  config.text_config.hidden_act = 'gelu'
  with pytest.raises(ValueError, match="text hidden_act='gelu'; only silu"):
    load_hf_llava(write_dir(tmp_path / 'a', config, sd))
  config = model.config.__class__.from_dict(model.config.to_dict())
  config.vision_feature_layer = [-2, -5]
  with pytest.raises(ValueError, match='only a single layer'):
    load_hf_llava(write_dir(tmp_path / 'b', config, sd))


# -------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize('variant', ['mlp2x_gelu_sharded', 'linear_full_tied_rope'])
def test_round_trip_hf_import_export_reload(tiny, variant, tmp_path):
  if variant == 'mlp2x_gelu_sharded':
    model, shard = tiny.hf_llava(seed=8), 40_000
  else:
    model, shard = tiny.hf_llava(projector_act='linear', select='full', tie=True, rope_theta=5e5, seed=9), 2**30
  model.save_pretrained(tmp_path / 'src')
  ours, params = load_hf_llava(str(tmp_path / 'src'))
  files = export_hf_llava(str(tmp_path / 'out'), ours.config, params, max_shard_bytes=shard)
  assert (len(files) > 1) == (variant == 'mlp2x_gelu_sharded')
  reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / 'out'),
                                                                              output_loading_info=True)
  assert info['missing_keys'] == set() and info['unexpected_keys'] == set() and info['mismatched_keys'] == set()
  if len(files) > 1:
    with open(tmp_path / 'out' / SAFE_INDEX) as f:
      keys = set(json.load(f)['weight_map'])
  else:
    keys = safetensors_keys(tmp_path / 'out' / 'model.safetensors')
  assert all(k.startswith(HUB_PREFIXES) for k in keys)
  assert any(k.startswith('vision_tower.vision_model.encoder.layers.3.') for k in keys)  # unused block kept
  assert ('language_model.lm_head.weight' in keys) == (not model.config.tie_word_embeddings)
  c, r = model.config, reloaded.config
  assert (r.text_config.rope_parameters['rope_theta'], r.text_config.num_key_value_heads, r.projector_hidden_act,
          r.vision_feature_select_strategy, r.tie_word_embeddings, r.image_token_id) == \
         (c.text_config.rope_parameters['rope_theta'], 2, c.projector_hidden_act,
          c.vision_feature_select_strategy, c.tie_word_embeddings, 100)
  ids, pixels = sample_inputs(ours.config, np.random.default_rng(1))
  want, got = hf_logits(model, ids, pixels), hf_logits(reloaded.eval(), ids, pixels)
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f'round trip {variant}: logits rel err {err:.2e}')
  if variant == 'mlp2x_gelu_sharded':
    assert err == 0  # every tensor copied bit-exactly
  else:
    assert err <= 1e-5  # the linear projector's two HF layers were folded into one (float64) and back


def test_export_of_trained_identity_projector_and_fp16(tmp_path):
  """Params that never came from HF (identity projector, random init incl. the unused CLIP block) export to a
  model transformers runs with our logits; --dtype float16 writes F16 tensors."""
  config = LlavaConfig(vision=VisionConfig(hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                                           patch_size=8, image_size=32),
                       text=LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                                        num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256),
                       projector='identity', image_token_id=100)
  rng = np.random.default_rng(3)

  def draw(path, leaf):  # numpy, not flax init (no compile); matrices ~ N(0, 0.1), norm scales ~ 1
    if leaf.ndim >= 2:
      return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
    base = 1.0 if 'scale' in jax.tree_util.keystr(path) else 0.0
    return (base + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(draw, abstract_params(config))
  export_hf_llava(str(tmp_path / 'fp32'), config, params)
  reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / 'fp32'),
                                                                              output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
  ids, pixels = sample_inputs(config, rng)
  want = hf_logits(reloaded.eval(), ids, pixels)
  got = np.asarray(jax.jit(Llava(config).apply)({'params': params}, ids.astype(np.int32),
                                                 pixels.transpose(0, 2, 3, 1)))
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
  back, back_params = load_hf_llava(str(tmp_path / 'fp32'))  # identity comes back as an exact linear projector
  assert back.config == config.replace(projector='linear')
  np.testing.assert_array_equal(back_params['projector']['linear_1']['kernel'], np.eye(64, dtype=np.float32))
  export_hf_llava(str(tmp_path / 'fp16'), config, params, dtype='float16')
  with open(tmp_path / 'fp16' / 'model.safetensors', 'rb') as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
  assert {v['dtype'] for k, v in header.items() if k != '__metadata__'} == {'F16'}
  half, _ = load_hf_llava(str(tmp_path / 'fp16'))
  assert half.config.param_dtype == 'float16'


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_import_then_export_with_tokenizer(ref, tmp_path, capsys):
  model, path, ours, params = ref
  out, hf_out = str(tmp_path / 'ours'), str(tmp_path / 'hf')
  cli(['import-hf', path, out, '--template', 'llava_v1'])
  m = load_model(out)
  assert m.config == ours.config and m.template == 'llava_v1'
  assert_trees_equal(jax.device_get(m.params), params)
  assert m.tokenizer.convert_tokens_to_ids('<image>') == 100
  cli(['export-hf', out, hf_out])
  reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(hf_out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  ids, pixels = sample_inputs(ours.config, np.random.default_rng(2))
  np.testing.assert_array_equal(hf_logits(reloaded.eval(), ids, pixels), hf_logits(model, ids, pixels))
  processor = transformers.AutoProcessor.from_pretrained(hf_out)
  enc = processor(text='t5 <image> t6', images=np.zeros((40, 50, 3), np.uint8), return_tensors='np')
  assert (enc['input_ids'] == 100).sum() == ours.config.num_image_tokens
  assert enc['pixel_values'].shape == (1, 3, 32, 32)
  n = len(safetensors_keys(os.path.join(path, 'model.safetensors')))
  err = capsys.readouterr().err
  assert f'converted {n} tensors' in err and f'exported {n} tensors' in err


def test_cli_original_release_adds_image_token(ref, clip_dir_of_ref, tmp_path):
  model = ref[0]
  path = original_release_dir(tmp_path / 'orig', model, clip_dir_of_ref, tokenizer=numbered_tokenizer(128, False))
  cli(['import-hf', path, str(tmp_path / 'ours'), '--dtype', 'bfloat16'])
  m = load_model(str(tmp_path / 'ours'))
  assert (m.config.image_token_id, m.config.text.vocab_size, m.config.param_dtype) == (128, 192, 'bfloat16')
  assert m.tokenizer.convert_tokens_to_ids('<image>') == 128
  assert m.params['language_model']['embed_tokens']['embedding'].dtype == jax.numpy.bfloat16


def test_cli_help(capsys):
  for argv in (['--help'], ['import-hf', '--help'], ['export-hf', '--help']):
    with pytest.raises(SystemExit) as e:
      cli(argv)
    assert e.value.code == 0
  assert '--vision-tower' in capsys.readouterr().out
