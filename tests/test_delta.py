"""Delta weights (`python -m llava_jax.convert apply-delta / make-delta`): a round trip gives the target back bit
for bit, applying a float16 delta equals the original release's `apply_delta` bit for bit, and deltas that do not
fit their base stop with an error naming the files and the tensor.

Base: a tiny random float16 LlamaForCausalLM (vocab 128). Target: the original release's LlavaLlamaForCausalLM
(the class its deltas were made from) on that shape with 3 more tokens (<im_patch>, <im_start>, <im_end>) and a
linear `model.mm_projector`, float16, with a tokenizer.
"""
import json
import os

import numpy as np
import pytest
import torch
import transformers

from llava_jax.convert.__main__ import main as cli
from llava_jax.convert.delta import DeltaMismatchError, apply_delta, make_delta
from llava_jax.convert.safetensors_io import open_checkpoint, write_safetensors, TensorOut



def tensors(path):
  return {k: r.load() for k, r in open_checkpoint(str(path)).items()}


def assert_bitwise(got: dict, want: dict):
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    assert got[k].tobytes() == want[k].tobytes(), k


@pytest.fixture(scope='module')
def dirs(tiny, tmp_path_factory):
  root = tmp_path_factory.mktemp('delta')
  torch.manual_seed(0)
  base = tiny.randomize_(transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny.text)), seed=20)
  base.half().save_pretrained(root / 'base')
  target, tok = tiny.original_llava(str(root), projector='linear', load_tower=False)
  target.half().save_pretrained(root / 'target')
  tok.save_pretrained(root / 'target')
  return root


def test_round_trip_gives_the_target_bit_for_bit(dirs, capsys):
  cli(['make-delta', '--base', str(dirs / 'base'), '--target', str(dirs / 'target'), str(dirs / 'delta')])
  cli(['apply-delta', '--base', str(dirs / 'base'), '--delta', str(dirs / 'delta'), str(dirs / 'out')])
  target, delta = tensors(dirs / 'target'), tensors(dirs / 'delta')
  assert {v.dtype for v in delta.values()} == {np.dtype(np.float32)}  # stored wide (see delta.py)
  assert delta['model.embed_tokens.weight'].shape == (131, 64) and 'model.mm_projector.weight' in delta
  # The projector is LLaVA's own: copied; the shared weights are real differences.
  np.testing.assert_array_equal(delta['model.mm_projector.weight'], target['model.mm_projector.weight'])
  base = tensors(dirs / 'base')
  np.testing.assert_array_equal(delta['model.norm.weight'],
                                target['model.norm.weight'].astype(np.float64) - base['model.norm.weight'])
  assert_bitwise(tensors(dirs / 'out'), target)
  with open(dirs / 'out' / 'config.json') as f:
    assert json.load(f)['mm_use_im_start_end'] is True
  assert transformers.AutoTokenizer.from_pretrained(dirs / 'out').convert_tokens_to_ids('<im_end>') == 130
  err = capsys.readouterr().err
  assert "2 of LLaVA's own copied as is (model.mm_projector.bias, model.mm_projector.weight)" in err


def test_float16_delta_equals_the_original_apply_delta(dirs, capsys):
  """A float16 delta (as the original's make_delta writes) applied by us and by llava.model.apply_delta."""
  import llava
  from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
  # tests/llava_original.py registers the package without its __init__, which apply_delta imports the class from.
  llava.LlavaLlamaForCausalLM = getattr(llava, 'LlavaLlamaForCausalLM', LlavaLlamaForCausalLM)
  from llava.model.apply_delta import apply_delta as original_apply_delta
  stats = make_delta(str(dirs / 'base'), str(dirs / 'target'), str(dirs / 'delta16'), dtype='float16')
  assert stats['combined'] == len(tensors(dirs / 'base')) and stats['copied'] == 2
  assert stats['not_bitwise']  # float16 arithmetic loses bits: why the default delta dtype is float32
  with pytest.raises(SystemExit, match=r'does not give the target back bit for bit in \d+ tensors'):
    cli(['make-delta', '--base', str(dirs / 'base'), '--target', str(dirs / 'target'), str(dirs / 'd'),
         '--dtype', 'float16'])
  apply_delta(str(dirs / 'base'), str(dirs / 'delta16'), str(dirs / 'ours'))
  original_apply_delta(str(dirs / 'base'), str(dirs / 'theirs'), str(dirs / 'delta16'))
  assert_bitwise(tensors(dirs / 'ours'), tensors(dirs / 'theirs'))


def test_delta_that_does_not_fit_is_an_error_naming_files_and_tensor(dirs, tmp_path):
  good = open_checkpoint(str(dirs / 'target'))
  bad = {k: r.load() for k, r in good.items()}
  bad['model.layers.1.self_attn.q_proj.weight'] = bad['model.layers.1.self_attn.q_proj.weight'][:32]
  bad['model.embed_tokens.weight'] = bad['model.embed_tokens.weight'][:100]  # fewer rows than the base
  write_safetensors(str(tmp_path / 'bad'), [TensorOut(k, v.shape, v.dtype, lambda v=v: v) for k, v in bad.items()])
  with pytest.raises(DeltaMismatchError) as e:
    apply_delta(str(dirs / 'base'), str(tmp_path / 'bad'), str(tmp_path / 'out'))
  msg = str(e.value)
  bad_file, base_file = os.path.join(tmp_path, 'bad', 'model.safetensors'), os.path.join(dirs, 'base',
                                                                                          'model.safetensors')
  assert f'tensor model.layers.1.self_attn.q_proj.weight: {bad_file} has shape (32, 64), {base_file} has (64, 64)' \
      in msg
  assert f'tensor model.embed_tokens.weight: {bad_file} has shape (100, 64), {base_file} has (128, 64)' in msg
  assert not os.path.exists(tmp_path / 'out')  # checked before anything is written
  with pytest.raises(SystemExit, match='error: the delta does not fit its base'):
    cli(['apply-delta', '--base', str(dirs / 'base'), '--delta', str(tmp_path / 'bad'), str(tmp_path / 'out')])
  with pytest.raises(SystemExit, match='error: .*no_such_dir does not exist'):
    cli(['apply-delta', '--base', str(tmp_path / 'no_such_dir'), '--delta', str(dirs / 'target'), str(tmp_path / 'o')])


def test_cli_help(capsys):
  for argv in (['apply-delta', '--help'], ['make-delta', '--help']):
    with pytest.raises(SystemExit) as e:
      cli(argv)
    assert e.value.code == 0
  out = capsys.readouterr().out
  assert '--base BASE' in out and '--delta DELTA' in out and '--target TARGET' in out
