"""Everything the train step needs, built once: the trainable/frozen split, the optimizer, shardings of state,
frozen params and batch on the mesh, and the step compiled ahead of time.

    setup = create(model_config, rules, optim, total_steps, mesh, global_batch=8, seq_len=256)
    state, frozen = init_state(setup, params)
    state, metrics = setup.step(state, frozen, batch)

`bench/` and the tests call these directly; `trainer.py` adds data, checkpoints and logging around them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from jax.sharding import Mesh, NamedSharding

from llava_jax import sharding
from llava_jax.models import lora as lora_lib
from llava_jax.models.config import LlavaConfig
from llava_jax.models.llava import Llava, abstract_params, param_logical_axes
from llava_jax.train import optim as optim_lib
from llava_jax.train import partition
from llava_jax.train.step import TrainState, make_train_step

@dataclasses.dataclass
class StepSetup:
  model_config: LlavaConfig
  model: Llava
  mesh: Mesh
  mask: dict[str, bool]             # '/'-path -> trainable
  tx: optax.GradientTransformation
  lr_schedule: Callable
  abstract_state: TrainState        # ShapeDtypeStructs carrying their shardings
  abstract_frozen: Any
  abstract_batch: dict[str, jax.ShapeDtypeStruct]
  step: Optional[Callable]          # compiled: (state, frozen, batch) -> (state, metrics); donates state
  memory: str                       # XLA's memory report of the compiled step
  lora: Optional[lora_lib.LoraSpec] = None
  base_bits: int = 0                # 8 | 4: the LoRA'd frozen kernels are qwix.QArrays in abstract_frozen
  quantized: dict = dataclasses.field(default_factory=dict)  # kernel path -> (stacked dims, input dims)

  @property
  def state_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.abstract_state)

  @property
  def frozen_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.abstract_frozen)

  @property
  def batch_shardings(self):
    return {k: v.sharding for k, v in self.abstract_batch.items()}


def _with_sharding(abstract, shardings, dtype=None):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=s), abstract, shardings)


def param_shardings(model_config: LlavaConfig, mesh: Mesh, lora=None):
  """NamedSharding per param from the logical axis names and `sharding.LOGICAL_RULES`."""
  return sharding.logical_to_mesh(param_logical_axes(model_config, lora), abstract_params(model_config, lora), mesh)


def quantize_plan(shapes, base_bits: int) -> dict[str, tuple[int, int]]:
  """QLoRA: every LoRA'd kernel is stored quantized. '/'-path -> (stacked dims, input dims)."""
  if not base_bits:
    return {}
  flat = partition.flatten(shapes)
  return {k: lora_lib.kernel_dims(flat[k].shape, flat[f + '/a'].shape, flat[f + '/b'].shape)[:2]
          for k, f in lora_lib.factor_paths(shapes).items()}


def abstract_split(model_config: LlavaConfig, mask, mesh: Mesh, lora=None, base_bits: int = 0):
  """(trainable fp32, frozen in compute dtype) ShapeDtypeStructs with shardings; with base_bits the LoRA'd frozen
  kernels are QArrays (qvalue sharded like the kernel, scales by the same logical axes where they divide)."""
  shapes = abstract_params(model_config, lora)
  shard = param_shardings(model_config, mesh, lora)
  t_shape, f_shape = partition.split(shapes, mask)
  t_shard, f_shard = partition.split(shard, mask)
  dtype = jnp.dtype(model_config.dtype)
  frozen = _with_sharding(f_shape, f_shard, dtype)
  plan = quantize_plan(shapes, base_bits)
  if plan:
    flat = partition.flatten(frozen)
    specs = partition.flatten(param_logical_axes(model_config, lora))
    for path, dims in plan.items():
      q = jax.eval_shape(lambda w: lora_lib.quantize_kernel(w, base_bits, *dims, dtype), flat[path])
      # Sharded by the kernel's logical axes where they divide (packed 4-bit codes halve the last dim).
      sh = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.logical_to_mesh(specs[path], a, mesh))
      flat[path] = dataclasses.replace(q, qvalue=sh(q.qvalue), scale=sh(q.scale))
    frozen = partition.unflatten(flat)
  return _with_sharding(t_shape, t_shard, jnp.float32), frozen


def opt_state_shardings(tx, abstract_trainable, mesh: Mesh):
  """Moments shard like their params; counts and other scalars are replicated."""
  state = jax.eval_shape(tx.init, abstract_trainable)
  shard = jax.tree.map(lambda a: a.sharding, abstract_trainable)
  masked = lambda x: isinstance(x, optax.MaskedNode)
  out = optax.tree_map_params(tx, lambda x, s: x if masked(x) else s, state, shard,
                              transform_non_params=lambda _: sharding.replicated(mesh),
                              is_leaf=lambda x: isinstance(x, NamedSharding) or masked(x))
  return _with_sharding(state, out)


def abstract_batch(mesh: Mesh, model_config: LlavaConfig, global_batch: int, seq_len: int, *, packed: bool = False,
                   image_slots: Optional[int] = None):
  """The batch the step takes (see step.make_train_step): packed rows add segment_ids and positions; with
  `image_slots` the images come as [global_batch, image_slots, H, W, 3] plus image_valid."""
  ids = jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
  size = model_config.vision.image_size
  batch = {'input_ids': ids, 'labels': ids, 'attention_mask': ids}
  if packed:
    batch.update(segment_ids=ids, positions=ids)
  if image_slots is None:
    batch['pixel_values'] = jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32,
                                                 sharding=sharding.batch_sharding(mesh, 4))
  else:
    batch['pixel_values'] = jax.ShapeDtypeStruct((global_batch, image_slots, size, size, 3), jnp.float32,
                                                 sharding=sharding.batch_sharding(mesh, 5))
    batch['image_valid'] = jax.ShapeDtypeStruct((global_batch, image_slots), jnp.bool_,
                                                sharding=sharding.batch_sharding(mesh, 2))
  return batch


def create(model_config: LlavaConfig, rules, optim, total_steps: int, mesh: Mesh, *, global_batch: int,
           seq_len: int, grad_accum_steps: int = 1, compile: bool = True, packed: bool = False,
           image_slots: Optional[int] = None, lora=None, base_bits: int = 0, seed: int = 0) -> StepSetup:
  """Split, optimizer, shardings and the ahead-of-time compiled step (`step` is None with compile=False).

  `optim`: the config's `optim` section; `packed`, `image_slots`: the batch layout (abstract_batch). `lora`: a
  LoraSpec (LoRA dropout draws from `seed` and the step); `base_bits` 8 | 4 stores its frozen kernels quantized.
  """
  model = Llava(model_config, lora)
  shapes = abstract_params(model_config, lora)
  if lora is not None:
    from llava_jax.train import config_checks
    errors = config_checks.lora_errors(model_config, lora, rules)
    if errors:
      raise ValueError('; '.join(errors))
  mask = partition.trainable_paths(shapes, rules)
  if not any(mask.values()):
    raise ValueError(f'train.trainable {list(rules)} leaves no parameter trainable')
  trainable, frozen = abstract_split(model_config, mask, mesh, lora, base_bits)
  extra = dict(lora=lora, base_bits=base_bits, quantized=quantize_plan(shapes, base_bits))
  tx, lr = optim_lib.make_optimizer(optim, total_steps, trainable)
  rep = sharding.replicated(mesh)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=trainable,
                     opt_state=opt_state_shardings(tx, trainable, mesh))
  batch = abstract_batch(mesh, model_config, global_batch, seq_len, packed=packed, image_slots=image_slots)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  fn = make_train_step(model, tx, lr, grad_accum_steps, dropout_seed=seed)
  jitted = jax.jit(fn, in_shardings=(state_sh, jax.tree.map(lambda x: x.sharding, frozen),
                                     {k: v.sharding for k, v in batch.items()}),
                   out_shardings=(state_sh, rep), donate_argnums=0)
  if not compile:
    return StepSetup(model_config, model, mesh, mask, tx, lr, state, frozen, batch, None, 'not compiled', **extra)
  with sharding.activation_rules(mesh):
    compiled = jitted.lower(state, frozen, batch).compile()
  return StepSetup(model_config, model, mesh, mask, tx, lr, state, frozen, batch, compiled,
                   _memory_report(compiled), **extra)


def _memory_report(compiled) -> str:
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend reports
    return 'memory analysis unavailable'
  if m is None:
    return 'memory analysis unavailable'
  mib = lambda n: f'{n / 2**20:.1f} MiB'
  return (f'compiled step memory per device: arguments {mib(m.argument_size_in_bytes)}, outputs '
          f'{mib(m.output_size_in_bytes)}, temporaries {mib(m.temp_size_in_bytes)}, '
          f'aliased {mib(m.alias_size_in_bytes)}')


def init_state(setup: StepSetup, params) -> tuple[TrainState, Any]:
  """Full params (any dtype / placement) -> (TrainState with fresh optimizer state, frozen params) on the mesh."""
  trainable, frozen = partition.split(params, setup.mask)
  return new_state(setup, place(trainable, setup.abstract_state.params)), place_frozen(setup, frozen)


def place(tree, abstract):
  """Cast and shard `tree` like the ShapeDtypeStructs in `abstract`."""
  return jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x).astype(a.dtype), a.sharding), tree, abstract)


def place_frozen(setup: StepSetup, frozen):
  """Frozen params -> the step's frozen tree: cast and sharded, the LoRA'd kernels quantized with base_bits."""
  flat = partition.flatten(frozen)
  flat = {k: quantize_leaf(setup, k, v) if k in setup.quantized else v for k, v in flat.items()}
  return place(partition.unflatten(flat), setup.abstract_frozen)


def quantize_leaf(setup: StepSetup, path: str, w):
  """One frozen kernel -> its QArray (as `abstract_frozen` describes it), made directly in its shardings."""
  if isinstance(w, qwix.QArray):
    return w
  abstract = partition.flatten(setup.abstract_frozen)[path]
  lead, n_in = setup.quantized[path]
  fn = jax.jit(lambda v: lora_lib.quantize_kernel(v.astype(abstract.scale.dtype), setup.base_bits, lead, n_in,
                                                  abstract.scale.dtype),
               out_shardings=jax.tree.map(lambda b: b.sharding, abstract))
  return fn(w)


def plain_frozen(setup: StepSetup):
  """abstract_frozen with every QArray as the compute-dtype kernel it is made from."""
  plain = partition.flatten(abstract_split(setup.model_config, setup.mask, setup.mesh, setup.lora)[1])
  return partition.unflatten({k: plain[k] if isinstance(a, qwix.QArray) else a
                              for k, a in partition.flatten(setup.abstract_frozen).items()})


def new_state(setup: StepSetup, trainable) -> TrainState:
  """Step 0: placed trainable params, fresh optimizer state (sharded like them)."""
  opt_sh = jax.tree.map(lambda x: x.sharding, setup.abstract_state.opt_state)
  opt_state = jax.jit(setup.tx.init, out_shardings=opt_sh)(trainable)
  rep = sharding.replicated(setup.mesh)
  # Made by a compiled function, not device_put: with several processes, device_put of host values compares
  # them across processes first (a collective program compiled per call).
  step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=rep)()
  return TrainState(step=step, params=trainable, opt_state=opt_state)


def make_global_batch(setup: StepSetup, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over ('data', 'fsdp') (one process: the whole batch)."""
  return {k: jax.make_array_from_process_local_data(a.sharding, np.asarray(local_batch[k]), a.shape)
          for k, a in setup.abstract_batch.items()}
