"""LoRA / QLoRA: parity with peft on the same HF model, what trains, export (merged and PEFT adapter), import,
QLoRA against bf16, bit-exact resume and the errors for bad input.

Tiny HF LLaVA of conftest (2-layer LLaMA, 4 heads / 2 kv heads, 16 image tokens), fp32 unless bf16 is what is
tested; LoRA r 4, alpha 8 on every Linear of the LLM but lm_head.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llava_jax.convert import export_hf_llava, load_hf_llava
from llava_jax.convert import peft as peft_io
from llava_jax.models import lora as lora_lib
from llava_jax.models.llava import Llava, init_params
from llava_jax.train import cli, config_checks, partition

from test_models import llava_batch, positions_of

TARGETS = 'language_model/layers/.+/kernel'
SPEC = lora_lib.LoraSpec(rank=4, alpha=8.0, dropout=0.0, targets=TARGETS)
TOL = 1e-5


def rel_err(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


def random_factors(config, seed):
  """Factors of SPEC's shapes with B != 0 (at init B = 0 and A would get no gradient)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), lora=SPEC))['lora']
  return jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)


@pytest.fixture(scope='module')
def hf(tiny, tmp_path_factory):
  """(torch model, its dir, our config, our params with random LoRA factors, inputs)."""
  model = tiny.hf_llava(seed=11)
  path = str(tmp_path_factory.mktemp('hf_base'))
  model.save_pretrained(path)
  ours, params = load_hf_llava(path)
  factors = random_factors(ours.config, 0)
  ids, mask, labels, pixels = llava_batch(ours.config.num_image_tokens, np.random.default_rng(2))
  return model, path, ours.config, params, dict(params, lora=factors), (ids, mask, labels, pixels)


def our_inputs(batch):
  ids, mask, _, pixels = batch
  has_image = (ids == 100).any(1)
  pix = np.where(has_image[:, None, None, None], pixels, 0).transpose(0, 2, 3, 1)
  return ids.astype(np.int32), pix, mask.astype(np.int32)


def torch_forward(model, batch, labels=True):
  ids, mask, lab, pixels = batch
  has_image = (ids == 100).any(1)
  return model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels[has_image]),
               attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(positions_of(mask)),
               labels=torch.from_numpy(lab) if labels else None)


def torch_vs_ours(model, forward, params, batch) -> float:
  """Logits rel err (real tokens) of a torch model against our LoRA forward of `params`."""
  with torch.no_grad():
    ref = torch_forward(model, batch, labels=False).logits.numpy()
  ours = np.asarray(forward(params, *our_inputs(batch)))
  valid = batch[1].astype(bool)
  return rel_err(ours[valid], ref[valid])


@pytest.fixture(scope='module')
def forward(hf):
  """jit'd forward of the LoRA model (factors from the `lora` collection), one compile for the module."""
  config = hf[2]
  return jax.jit(lambda p, *a: Llava(config, SPEC).apply(lora_lib.variables(p), *a))


@pytest.fixture(scope='module')
def adapter_dir(hf, tmp_path_factory):
  _, _, config, _, with_lora, _ = hf
  return peft_io.write_adapter(str(tmp_path_factory.mktemp('adapter')), config, with_lora, SPEC)


@pytest.fixture(scope='module')
def peft_model(hf, adapter_dir):
  import peft
  base = transformers.LlavaForConditionalGeneration.from_pretrained(hf[1]).eval()
  return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def test_init_logits_equal_the_base_model_bitwise(hf, forward):
  _, _, config, params, _, batch = hf
  fresh = init_params(config, jax.random.key(3), lora=SPEC)['lora']
  assert all(not np.any(v) for k, v in partition.flatten(fresh).items() if k.endswith('/b'))  # B = 0
  args = our_inputs(batch)
  base = np.asarray(jax.jit(Llava(config).apply)({'params': params}, *args))
  with_lora = np.asarray(forward(dict(params, lora=fresh), *args))
  np.testing.assert_array_equal(with_lora, base)


def test_peft_adapter_in_torch_gives_our_logits(hf, forward, peft_model, adapter_dir):
  _, _, config, _, with_lora, batch = hf
  with open(os.path.join(adapter_dir, 'adapter_config.json')) as f:
    cfg = json.load(f)
  assert cfg['r'] == 4 and cfg['lora_alpha'] == 8.0 and cfg['modules_to_save'] == ['multi_modal_projector']
  lora_modules = [n for n, m in peft_model.named_modules() if hasattr(m, 'lora_A')]
  assert len(lora_modules) == 7 * 2 and all('language_model.layers.' in n for n in lora_modules)  # not CLIP's q_proj
  err = torch_vs_ours(peft_model, forward, with_lora, batch)
  print(f'PEFT adapter in torch vs ours: logits rel err {err:.2e}')
  assert err <= TOL


def test_first_step_gradients_equal_peft(hf, peft_model):
  _, _, config, params, with_lora, batch = hf
  from llava_jax.train.step import next_token_loss
  trainable = {'lora': with_lora['lora'], 'projector': with_lora['projector']}
  frozen = {k: v for k, v in params.items() if k != 'projector'}

  def loss(t):
    logits = Llava(config, SPEC).apply(lora_lib.variables({**frozen, **t}), *our_inputs(batch))
    total, count = next_token_loss(logits, jnp.asarray(batch[2], jnp.int32))
    return total / count

  grads = partition.flatten(jax.device_get(jax.jit(jax.grad(loss))(trainable)))
  peft_model.zero_grad()
  for n, p in peft_model.named_parameters():
    p.requires_grad_('lora_' in n or 'modules_to_save' in n)
  torch_forward(peft_model, batch).loss.backward()
  ref = {n: p.grad.numpy() for n, p in peft_model.named_parameters() if p.grad is not None}
  # Ours as peft's tensors (the adapter writer's mapping), compared name by name.
  with_grads = dict(params, lora=partition.unflatten({k[len('lora/'):]: v for k, v in grads.items()
                                                      if k.startswith('lora/')}),
                    projector=partition.unflatten({k[len('projector/'):]: v for k, v in grads.items()
                                                   if k.startswith('projector/')}))
  ours = _as_peft_tensors(config, with_grads)
  checked, worst = 0, 0.0
  for name, g in ours.items():
    key = name.replace('base_model.model.', '')
    match = [n for n in ref if n.replace('base_model.model.', '').replace('.default', '').replace(
        'modules_to_save.', '') == key]
    assert len(match) == 1, (name, sorted(ref)[:5])
    worst = max(worst, float(np.abs(g - ref[match[0]]).max()))
    checked += 1
  print(f'first-step gradients vs peft: {checked} tensors, max abs diff {worst:.2e}')
  assert checked == len(ref) == 2 * 7 * 2 + 4 and worst <= TOL


def _as_peft_tensors(config, params) -> dict:
  import tempfile
  from safetensors.numpy import load_file
  with tempfile.TemporaryDirectory() as d:
    peft_io.write_adapter(d, config, params, SPEC)
    return load_file(os.path.join(d, peft_io.WEIGHTS))


def test_merged_export_equals_the_unmerged_model(hf, forward, tmp_path):
  _, _, config, _, with_lora, batch = hf
  merged = lora_lib.merge(with_lora, SPEC.scale)
  assert 'lora' not in merged
  export_hf_llava(str(tmp_path / 'merged'), config, merged)
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / 'merged')).eval()
  err = torch_vs_ours(reloaded, forward, with_lora, batch)
  print(f'merged HF export vs unmerged: logits rel err {err:.2e}')
  assert err <= TOL


def test_adapter_reads_back_exactly(hf, adapter_dir):
  _, _, config, _, with_lora, _ = hf
  adapter = peft_io.read_adapter(adapter_dir, config)
  assert (adapter.spec.rank, adapter.spec.alpha) == (4, 8.0)
  for tree in ('lora', 'projector'):
    got, want = partition.flatten(getattr(adapter, tree)), partition.flatten(with_lora[tree])
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # The adapter's own targets name exactly its LoRA'd kernels.
  assert set(lora_lib.factor_paths({'lora': adapter.lora})) == {
      f'language_model/layers/{n}/kernel' for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
                                                    'down_proj')}
  assert all(lora_lib.LoraSpec(4, 8.0, 0.0, adapter.spec.targets).targets_module(tuple(k.split('/')[:-1]))
             for k in lora_lib.factor_paths({'lora': adapter.lora}))


def test_chat_and_serve_load_base_plus_adapter_as_the_merged_model(hf, adapter_dir, tmp_path):
  from llava_jax import chat, model_dir
  _, path, config, _, with_lora, _ = hf
  loaded = partition.flatten(jax.device_get(model_dir.load_model(path, adapter=adapter_dir).params))
  want = partition.flatten(jax.device_get(lora_lib.merge(with_lora, SPEC.scale)))
  assert set(loaded) == set(want)
  for k in want:
    np.testing.assert_allclose(loaded[k], want[k], rtol=0, atol=1e-6, err_msg=k)
  os.makedirs(tmp_path / 'bad')
  with open(tmp_path / 'bad' / 'adapter_config.json', 'w') as f:
    json.dump({'r': 4, 'lora_alpha': 8}, f)
  with pytest.raises(FileNotFoundError, match='is not a PEFT adapter dir'):
    model_dir.load_model(path, adapter=str(tmp_path / 'bad'))
  assert chat.main(['--checkpoint', path, '--adapter', str(tmp_path / 'bad')]) == 2  # clear error, exit 2


def test_adapter_for_another_base_is_an_error(hf, adapter_dir):
  config = hf[2]
  wider = config.replace(text=config.text.__class__(**{**config.text.__dict__, 'intermediate_size': 128}))
  with pytest.raises(peft_io.AdapterMismatch, match=r'mlp\.down_proj\.lora_A\.weight has shape \(4, 96\), the '
                                                    r'configured model needs \(4, 128\).*another base'):
    peft_io.read_adapter(adapter_dir, wider)
  shallower = config.replace(text=config.text.__class__(**{**config.text.__dict__, 'num_layers': 1}))
  with pytest.raises(peft_io.AdapterMismatch, match=r'LoRA on model\.language_model\.layers\.1\..*does not have'):
    peft_io.read_adapter(adapter_dir, shallower)


# ------------------------------------------------------------------------------------------ config and training

def tiny_lora(*overrides):
  return cli.load('configs/stage2_finetune.py:tiny_lora', ['init.allow_random_frozen=True', *overrides])


def test_lora_variant_is_the_original_recipe():
  c = cli.load('configs/stage2_finetune.py:llava15_7b_lora')
  assert (c.train.lora.r, c.train.lora.alpha, c.train.lora.dropout, c.optim.lr, c.optim.projector_lr) == \
         (128, 256.0, 0.05, 2e-4, 2e-5)
  assert c.train.trainable == (('lora/.*', True), ('projector/.*', True), ('.*', False))
  assert cli.load('configs/stage2_finetune.py:llava15_13b_lora').model.text.num_layers == 40


@pytest.mark.parametrize('override, message', [
    ('train.lora.targets=language_model/layers/nothing_proj/kernel',
     r"train\.lora\.targets='language_model/layers/nothing_proj/kernel' matches no Dense kernel of the model"),
    ('train.lora.r=100', r'train\.lora\.r=100 exceeds the dimensions of language_model/layers/\w+/kernel'),
    ('train.lora.targets=.*kernel', r'matches projector/linear_1/kernel: LoRA applies to the LLM'),
    ('train.lora.r=0', r"init\.adapter_dir='x' needs LoRA: set train\.lora\.r > 0"),
])
def test_bad_lora_config_names_the_key(override, message):
  c = tiny_lora(override, 'init.adapter_dir=x') if 'r=0' in override else tiny_lora(override)
  errors = config_checks.stage_errors(c, num_devices=1, check_paths=False)
  assert any(__import__('re').search(message, e) for e in errors), errors


def test_lora_with_the_stage2_mask_is_an_error():
  c = tiny_lora()
  with c.unlocked():
    c.train.trainable = (('projector/.*', True), ('language_model/.*', True), ('lora/.*', True), ('.*', False))
  errors = config_checks.stage_errors(c, num_devices=1, check_paths=False)
  assert any('train.trainable trains language_model/layers/' in e and 'base stays frozen' in e for e in errors)


# ------------------------------------------------------------------------------------------------- train step

@pytest.fixture(scope='module')
def lora_steps():
  """The tiny preset's LoRA stage 2 (dropout 0.1) on one device: 2 compiled steps from random params."""
  from llava_jax import sharding
  from llava_jax.models import presets
  from llava_jax.train import setup as setup_lib
  from test_train_step import make_batch, optim
  cfg = presets.get_model_config('tiny')
  spec = lora_lib.LoraSpec(4, 8.0, 0.1, TARGETS)
  rules = tiny_lora().train.trainable
  setup = setup_lib.create(cfg, rules, optim(projector_lr=1e-4), 10, sharding.make_mesh((1, 1, 1), jax.devices()[:1]),
                           global_batch=8, seq_len=40, lora=spec)
  params = jax.device_get(init_params(cfg, jax.random.key(1), lora=spec))
  state, frozen = setup_lib.init_state(setup, params)
  for seed in range(2):
    state, m = setup.step(state, frozen, setup_lib.make_global_batch(setup, make_batch(cfg, seed)))
    assert int(m['finite']) == 1
  return setup, params, state, frozen


def test_only_lora_and_projector_train_and_hold_optimizer_state(lora_steps):
  from test_train_step import _changed, _opt_param_paths
  setup, params, state, frozen = lora_steps
  assert set(state.params) == {'lora', 'projector'} and set(frozen) == {'vision_tower', 'language_model'}
  after = jax.device_get(partition.merge(state.params, frozen))
  flat = partition.flatten(after)
  assert _changed(params, after) == {k for k in flat if k.startswith(('lora/', 'projector/'))}
  # optimizer.projector_lr: two AdamW states, keyed by their label ('projector' | 'rest') first.
  assert {p.split('/', 1)[1] for p in _opt_param_paths(state.opt_state)} == set(partition.flatten(state.params))
  n = sum(x.size for x in jax.tree.leaves(state.params))
  assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0) == 2 * n


def test_frozen_base_is_stored_in_the_compute_dtype():
  from llava_jax import sharding
  from llava_jax.models import presets
  from llava_jax.train import setup as setup_lib
  from test_train_step import optim
  cfg = presets.get_model_config('tiny', dtype='bfloat16')
  for bits, kernel_dtype in ((0, 'bfloat16'), (8, 'int8'), (4, 'uint8')):
    setup = setup_lib.create(cfg, tiny_lora().train.trainable, optim(), 10, sharding.make_mesh((1, 1, 1),
                             jax.devices()[:1]), global_batch=8, seq_len=40, lora=SPEC, base_bits=bits, compile=False)
    frozen = partition.flatten(setup.abstract_frozen)
    q = frozen['language_model/layers/q_proj/kernel']
    assert (q.qvalue.dtype if bits else q.dtype) == jnp.dtype(kernel_dtype)
    if bits:  # blockwise scales in the compute dtype; 4-bit codes two to a byte
      assert q.scale.dtype == jnp.bfloat16 and q.qvalue.shape[-1] == 16 // (2 if bits == 4 else 1)
    assert frozen['language_model/embed_tokens/embedding'].dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(setup.abstract_state.params)} == {jnp.dtype('float32')}


# ------------------------------------------------------------------------------------------------- trainer

@pytest.fixture(scope='module')
def colours(tmp_path_factory):
  from conftest import colour_dataset
  return colour_dataset(str(tmp_path_factory.mktemp('colors')), 16)


def trainer_config(dataset, workdir, **extra):
  from test_train_loop import overrides
  settings = {'train.steps': 4, 'train.lora.dropout': 0.1, 'optim.projector_lr': 1e-3, **extra}
  config = cli.load('configs/stage2_finetune.py:tiny_lora', overrides(dataset, **settings), workdir=str(workdir))
  config_checks.validate(config, num_devices=jax.device_count())
  return config


@pytest.fixture(scope='module')
def trained(colours, tmp_path_factory):
  from llava_jax.train import trainer
  workdir = tmp_path_factory.mktemp('lora_full')
  config = trainer_config(colours, workdir, **{'export.peft_dir': str(workdir / 'adapter'),
                                               'export.hf_dir': str(workdir / 'hf')})
  return workdir, trainer.train(config, str(workdir), log=lambda s: None)


def test_lora_resume_is_bitwise(colours, trained, tmp_path):
  from llava_jax.train import trainer
  from test_train_loop import exported_params
  full_dir, full = trained
  first = trainer.train(trainer_config(colours, tmp_path), str(tmp_path), stop_after=2, log=lambda s: None)
  assert first['status'] == 'preempted'
  second = trainer.train(trainer_config(colours, tmp_path), str(tmp_path), log=lambda s: None)
  assert second['status'] == 'completed'
  assert first['losses'] + second['losses'] == full['losses']  # dropout masks from (seed, step): bitwise
  a, b = exported_params(full_dir), exported_params(tmp_path)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_trainer_exports_merged_and_peft_and_the_adapter_continues_training(colours, trained, tmp_path):
  from llava_jax import sharding
  from llava_jax.train import init as init_lib
  from llava_jax.train import setup as setup_lib
  from test_train_loop import exported_params
  workdir, _ = trained
  config = trainer_config(colours, tmp_path, **{'init.adapter_dir': str(workdir / 'adapter')})
  mc = config_checks.model_config(config)
  spec = config_checks.lora_spec(config)
  setup = setup_lib.create(mc, config.train.trainable, config.optim, 4, sharding.make_mesh((1, -1, 1)),
                           global_batch=8, seq_len=config.data.max_length, compile=False, lora=spec)
  logs = []
  trainable, frozen = init_lib.initial_params(config.init, mc, setup.mask, setup.abstract_state.params,
                                              setup_lib.plain_frozen(setup), config.seed, log=logs.append, lora=spec)
  assert logs[-1] == f'init: LoRA factors and projector <- {workdir / "adapter"} (init.adapter_dir)'
  # The exported (merged) model = our base + (alpha / r) A B of the adapter the same run wrote.
  merged = exported_params(workdir)
  base = partition.merge(trainable, frozen)  # random base of seed 0, as the trained run had
  again = partition.flatten(jax.device_get(lora_lib.merge(base, spec.scale)))
  for k, v in partition.flatten(merged).items():
    np.testing.assert_allclose(again[k], v, rtol=0, atol=1e-6, err_msg=k)
  wrong = trainer_config(colours, tmp_path, **{'init.adapter_dir': str(workdir / 'adapter'), 'train.lora.r': 2})
  with pytest.raises(peft_io.AdapterMismatch, match='the adapter has r 4, train.lora.r is 2'):
    init_lib.initial_params(wrong.init, mc, setup.mask, setup.abstract_state.params, setup_lib.plain_frozen(setup),
                            0, log=logs.append, lora=config_checks.lora_spec(wrong))


# ------------------------------------------------------------------------------------------------- QLoRA

@pytest.fixture(scope='module')
def bf16_forward(hf):
  """(forward, params, bf16 reference logits): the LoRA model in bf16 compute with its base kept in bf16; factors
  a tenth of the other tests' (there the random deltas alone make bf16 differ from fp32 by 7%)."""
  config = hf[2].replace(dtype='bfloat16')
  fwd = jax.jit(lambda p, *a: Llava(config, SPEC).apply(lora_lib.variables(p), *a))
  with_lora = dict(hf[3], lora=jax.tree.map(lambda x: 0.1 * x, random_factors(hf[2], 1)))
  bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), with_lora)
  return config, fwd, with_lora, np.asarray(fwd(bf16, *our_inputs(hf[5])), np.float32)


# Measured logits rel err against bf16: int8 3.0e-2, nf4 3.6e-1; per kernel, rel RMS error int8 0.6%, nf4 9.1%
# (absmax scales per 64 inputs; nf4 has 16 levels). This random tiny model amplifies weight noise: its base alone in
# bf16 differs from fp32 by 1.5e-2 (bf16 rounding is 0.4% per weight). Tolerances: about twice the measured.
@pytest.mark.parametrize('bits, tol', [(8, 6e-2), (4, 6e-1)])
def test_qlora_logits_stay_close_to_bf16(hf, bf16_forward, bits, tol):
  from llava_jax import sharding
  from llava_jax.train import setup as setup_lib
  from test_train_step import optim
  config, fwd, with_lora, ref = bf16_forward
  batch = hf[5]
  setup = setup_lib.create(config, tiny_lora().train.trainable, optim(), 10, sharding.make_mesh((1, 1, 1),
                           jax.devices()[:1]), global_batch=3, seq_len=26, lora=SPEC, base_bits=bits, compile=False)
  trainable, frozen = partition.split(with_lora, setup.mask)
  frozen = setup_lib.place_frozen(setup, frozen)
  kernels = {k: v for k, v in partition.flatten(frozen).items() if k in setup.quantized}
  assert len(kernels) == 7 and all(isinstance(q, __import__('qwix').QArray) for q in kernels.values())
  stored = sum(partition.tree_bytes(q) for q in kernels.values())
  plain = 2 * sum(lora_lib.num_elements(q) for q in kernels.values())
  assert stored <= plain * (0.5 if bits == 8 else 0.25) * 1.15  # + bf16 scales, one per 64 (o_proj: 16) inputs
  flat = partition.flatten(with_lora)
  for k, q in kernels.items():
    w = np.asarray(jnp.asarray(flat[k], jnp.bfloat16), np.float32)
    dq = np.asarray(lora_lib.dequantize(q), np.float32)
    assert np.sqrt(((dq - w) ** 2).mean() / (w ** 2).mean()) <= (0.01 if bits == 8 else 0.12), k
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), trainable)
  logits = np.asarray(fwd(partition.merge(params, frozen), *our_inputs(batch)), np.float32)
  valid = batch[1].astype(bool)
  err = rel_err(logits[valid], ref[valid])
  print(f'QLoRA {bits}-bit vs bf16: logits rel err {err:.2e}, base kernels {stored} bytes vs {plain} in bf16')
  assert err <= tol


def test_dry_run_sizes_lora_and_qlora():
  """The tiny LoRA stage on one CPU device: the dry run builds the LoRA step, and 4-bit halves and halves again
  the LoRA'd kernels' share of the frozen bytes (the rest of the base stays in the compute dtype)."""
  from llava_jax.train import dry_run
  results = {}
  for bits in (0, 4):
    config = tiny_lora('mesh.shape=(1,1,1)', f'train.lora.base_bits={bits}', 'model.dtype=bfloat16')
    lines = []
    results[bits] = dry_run.dry_run(config, devices=jax.devices()[:1], log=lines.append)
    assert 'LoRA r 4' in lines[1] and (', base 4-bit' in lines[1]) == bool(bits)
  full, q = results[0], results[4]
  assert q['trainable_params'] == full['trainable_params'] and q['optimizer_state'] == full['optimizer_state']
  # The tiny LLM's 2 layers hold 73,728 Linear weights: 2 bytes each in bf16, 0.5 in nf4 plus bf16 block scales.
  saved = full['frozen_params'] - q['frozen_params']
  assert 0.9 * 73_728 * 1.5 < saved < 73_728 * 1.5
