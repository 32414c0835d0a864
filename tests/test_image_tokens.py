"""The original release's image token layouts: `<im_start>` + image + `<im_end>` (mm_use_im_start_end) and
`<im_patch>` as the image token (mm_use_im_patch_token).

Checked: the prompt layout (exact ids on a word-level tokenizer; supervised tokens equal to the original's
preprocess with mm_use_im_start_end on the real SentencePiece tokenizer); import of an original-release checkpoint
with both layouts against the original LlavaLlamaForCausalLM (logits <= 1e-4); its export to HF, where
LlavaProcessor's `image_token` is `<im_patch>` and LlavaForConditionalGeneration gives the same logits; new token
rows at the mean; the stage-1 mask training the input embeddings.
"""
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from tokenizers import AddedToken

import family_tokenizers
import llava_original as original
from llava_jax import model_dir
from llava_jax.convert import export_hf_llava, load_hf_llava
from llava_jax.data.tokenize import (IM_END, IM_PATCH, IM_START, ImageTokens, add_image_token, tokenize_conversation,
                                     tokenize_prompt)
from llava_jax.models.llava import abstract_params
from llava_jax.train import config_checks, partition
from llava_jax.train.init import _place

from conftest import word_tokenizer
from test_models import rel_err
from test_data_templates import CONV, supervised_runs

N = 16  # image tokens of the tiny tower (32 px / 8 px patches)
QA = [{'from': 'human', 'value': '<image>\nw1 w2'}, {'from': 'gpt', 'value': 'w3 w4'}]


@pytest.fixture(scope='module')
def orig(tiny, tmp_path_factory):
  """An original-release checkpoint with both layouts: vocab 131 = 128 words + <im_patch> (128), <im_start>,
  <im_end>; mlp2x_gelu projector; the CLIP tower inside the checkpoint."""
  root = tmp_path_factory.mktemp('orig')
  model, tok = tiny.original_llava(str(root))
  model.save_pretrained(root / 'llava')
  tok.save_pretrained(root / 'llava')
  ours, params = load_hf_llava(str(root / 'llava'))
  pixels = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
  ids = [1, 5, 129, IM_PATCH, 130, 7, 8, 9, 10]  # BOS w1 <im_start> image <im_end> ...
  with torch.no_grad():
    ref = model(input_ids=torch.tensor([[-200 if t == IM_PATCH else t for t in ids]]),
                images=torch.from_numpy(pixels)).logits.numpy()
  ours_ids = np.array([sum(([128] * N if t == IM_PATCH else [t] for t in ids), [])], np.int32)
  return dict(root=root, tok=tok, ours=ours, params=params, pixels=pixels, ids=ours_ids, ref=ref)


def test_layout_in_the_prompt():
  tok = word_tokenizer(['w1', 'w2', 'w3', 'w4', 'USER', 'ASSISTANT', ':'])  # ids 4..10 after 4 specials
  for t in (IM_PATCH, IM_START, IM_END):
    add_image_token(tok, t)
  patch, start, end = (tok.convert_tokens_to_ids(t) for t in (IM_PATCH, IM_START, IM_END))
  layout = ImageTokens(3, IM_PATCH, start_end=True)
  out = tokenize_conversation(QA, tok, 'plain', layout)  # plain: a bare image, as the original's preprocess_plain
  assert out['input_ids'].tolist() == [1, patch, patch, patch, 6, 7]  # BOS, image, 'w3 w4' (its '\n' is a space)
  out = tokenize_conversation(QA, tok, 'vicuna_v1', layout)
  ids = out['input_ids'].tolist()
  i = ids.index(start)
  assert ids[i:i + 5] == [start, patch, patch, patch, end] and ids.count(patch) == 3
  assert (out['labels'][i:i + 5] == -100).all()
  no_wrap = tokenize_conversation(QA, tok, 'vicuna_v1', ImageTokens(3, IM_PATCH))
  assert ids[:i] + ids[i + 1:i + 4] + ids[i + 5:] == no_wrap['input_ids'].tolist()  # only the two tokens added
  assert out['labels'][out['labels'] != -100].tolist() == no_wrap['labels'][no_wrap['labels'] != -100].tolist()
  prompt = tokenize_prompt(QA[:1], tok, 'vicuna_v1', layout).tolist()
  assert prompt == ids[:len(prompt)] and prompt[i:i + 5] == ids[i:i + 5]
  cut = tokenize_conversation(QA, tok, 'vicuna_v1', layout, max_length=i + 4)  # ends before <im_end>
  assert cut['dropped'] and cut['drop_reason'] == 'image_cut'
  bare = word_tokenizer(['w1'], image_token=True)
  with pytest.raises(ValueError, match="tokenizer has no special '<im_start>' token"):
    tokenize_conversation(QA, bare, 'vicuna_v1', ImageTokens(3, start_end=True))


@pytest.mark.parametrize('name', ['vicuna_v1', 'llava_llama_2', 'llava_v1'])
def test_supervised_tokens_equal_original_with_start_end(tmp_path, name):
  """The real SentencePiece tokenizer (mistral-common's LLaMA model) with <image>, <im_start>, <im_end> added."""
  tok = family_tokenizers.mistral(str(tmp_path), legacy=True)
  add_image_token(tok)
  tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in (IM_START, IM_END)], special_tokens=True)
  tok.model_max_length, tok.pad_token = 2048, tok.unk_token
  ours = tokenize_conversation(CONV, tok, name, ImageTokens(1, start_end=True))
  theirs = original.preprocess(name, CONV, tok, True, mm_use_im_start_end=True)
  runs = lambda labels: [tok.convert_ids_to_tokens(r) for r in supervised_runs(labels)]
  assert runs(ours['labels']) == runs(theirs['labels']) and len(runs(ours['labels'])) == len(CONV) // 2
  start, end, image = (tok.convert_tokens_to_ids(t) for t in (IM_START, IM_END, '<image>'))
  for ids, image_id in ((ours['input_ids'].tolist(), image), (theirs['input_ids'], -200)):
    i = ids.index(image_id)
    assert ids[i - 1:i + 2] == [start, image_id, end]


def test_import_original_checkpoint_matches_the_original(orig):
  c = orig['ours'].config
  assert (c.mm_use_im_start_end, c.mm_use_im_patch_token, c.image_token_id, c.text.vocab_size) == (True, True, 128,
                                                                                                    131)
  assert ImageTokens.of(c) == ImageTokens(N, IM_PATCH, True)
  logits = np.asarray(jax.jit(orig['ours'].apply)({'params': orig['params']}, orig['ids'],
                                                   orig['pixels'].transpose(0, 2, 3, 1)))
  err = rel_err(logits, orig['ref'])
  print(f'original start/end + patch-token LLaVA: logits rel err {err:.2e}')
  assert err <= 1e-4
  model_dir.check_tokenizer(orig['tok'], c, 'x')  # <im_patch> = 128, <im_start> / <im_end> present


def test_export_to_hf_image_token_is_im_patch(orig, tmp_path):
  c, tok = orig['ours'].config, orig['tok']
  export_hf_llava(str(tmp_path), c, orig['params'], tokenizer=tok)
  with open(tmp_path / 'config.json') as f:
    raw = json.load(f)
  assert (raw['image_token_index'], raw['mm_use_im_start_end'], raw['mm_use_im_patch_token']) == (128, True, True)
  processor = transformers.AutoProcessor.from_pretrained(tmp_path)
  assert processor.image_token == IM_PATCH
  enc = processor(text='w1 <im_start><im_patch><im_end> w3 w4 w5 w6', images=np.zeros((32, 32, 3), np.uint8),
                  return_tensors='np')
  assert enc['input_ids'][0].tolist() == orig['ids'][0, 1:].tolist()  # the word tokenizer adds no BOS
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
  with torch.no_grad():
    logits = hf(input_ids=torch.from_numpy(orig['ids'].astype(np.int64)),
                pixel_values=torch.from_numpy(orig['pixels'])).logits.numpy()
  assert rel_err(logits, orig['ref']) <= 1e-4
  back, params = load_hf_llava(str(tmp_path))  # our export keeps the layout keys
  assert back.config == c
  jax.tree.map(np.testing.assert_array_equal, params, orig['params'])


def test_new_rows_mean_and_stage1_trains_input_embeddings():
  loaded = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  target = jax.numpy.zeros((8, 4))
  grown = np.asarray(_place(loaded, target, 'language_model/embed_tokens/embedding', 'x', mean_rows=True))
  np.testing.assert_array_equal(grown[:5], loaded)
  np.testing.assert_allclose(grown[5:], np.broadcast_to(loaded.mean(0), (3, 4)), rtol=1e-6)
  head = np.asarray(_place(loaded.T, jax.numpy.zeros((4, 8)), 'language_model/lm_head/kernel', 'x', mean_rows=True))
  np.testing.assert_allclose(head[:, 5:], np.broadcast_to(loaded.T.mean(1, keepdims=True), (4, 3)), rtol=1e-6)

  from configs import common, stage1_pretrain
  c = stage1_pretrain.get_config('variant=tiny,im_start_end=true,im_patch_token=true')
  assert c.model.mm_use_im_start_end and c.model.mm_use_im_patch_token
  mc = config_checks.model_config(c)
  mask = partition.trainable_paths(abstract_params(mc), c.train.trainable)
  assert mask['language_model/embed_tokens/embedding'] and mask['projector/linear_1/kernel']
  assert not mask['language_model/lm_head/kernel'] and not mask['language_model/layers/q_proj/kernel']
  c.train.trainable = common.STAGE1_TRAINABLE
  errors = config_checks.stage_errors(c, num_devices=1, check_paths=False)
  assert any('train.trainable freezes language_model/embed_tokens, but model.mm_use_im_start_end=True' in e
             for e in errors)


def test_stage2_takes_the_token_rows_stage1_trained(tiny, tmp_path):
  """llm_from has 500 rows, the model 512: rows 500.. start at the mean of the LLM's rows, then take the values
  of the stage-1 export (init.projector_from), as the original's stage 2 loads them from its stage-1 file."""
  import ml_collections
  from conftest import random_params
  from llava_jax.models import presets
  from llava_jax.train.init import initial_params
  cfg = presets.get_model_config('tiny', mm_use_im_start_end=True)
  t = cfg.text
  llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=500, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
      num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, rms_norm_eps=t.rms_norm_eps))
  llm.save_pretrained(tmp_path / 'llm')
  stage1 = random_params(cfg, seed=1)
  model_dir.save_model(str(tmp_path / 'stage1'), cfg, stage1)
  rules = (('projector/.*', True), ('language_model/.*', True), ('.*', False))
  mask = partition.trainable_paths(abstract_params(cfg), rules)
  trainable, frozen = partition.split(abstract_params(cfg), mask)
  init = ml_collections.ConfigDict(dict(model_from=None, vision_from=None, llm_from=str(tmp_path / 'llm'),
                                        projector_from=str(tmp_path / 'stage1')))
  lines = []
  got, _ = initial_params(init, cfg, mask, trainable, frozen, 0, log=lines.append)
  embed = np.asarray(got['language_model']['embed_tokens']['embedding'])
  want = llm.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(embed[:500], want)
  np.testing.assert_array_equal(embed[500:], stage1['language_model']['embed_tokens']['embedding'][500:])
  head = np.asarray(got['language_model']['lm_head']['kernel'])  # output rows: the mean (stage 1 froze them)
  np.testing.assert_allclose(head[:, 500:], np.broadcast_to(llm.lm_head.weight.detach().numpy().mean(0)[:, None],
                                                            (t.hidden_size, 12)), rtol=1e-5, atol=1e-7)
  assert any('language_model/embed_tokens/embedding[500:]' in line for line in lines)
