"""Device mesh ('data', 'fsdp', 'tensor') and the one table mapping logical axis names to mesh axes."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# logical name -> mesh axes. Weights shard their 'embed' dim over fsdp and their head/mlp/vocab dim over tensor;
# activations shard the batch over data+fsdp and their head/mlp/vocab dim over tensor.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ('activation_batch', BATCH_AXES),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_mlp', 'tensor'),
    ('activation_heads', 'tensor'),
    ('activation_kv_heads', 'tensor'),
    ('activation_vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('q_heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('vocab', 'tensor'),
    ('layers', None),
    ('norm', None),
)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with a -1 entry resolved to the remaining devices; ValueError when it does not fit."""
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f'mesh shape {shape} must have 3 entries for axes {MESH_AXES}')
  if shape.count(-1) > 1:
    raise ValueError(f'mesh shape {shape}: at most one axis may be -1')
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if num_devices % rest:
      raise ValueError(f'mesh shape {shape} does not divide {num_devices} devices')
    shape[shape.index(-1)] = num_devices // rest
  if math.prod(shape) != num_devices:
    raise ValueError(f'mesh shape {tuple(shape)} (= {math.prod(shape)} devices) does not match the '
                     f'{num_devices} available devices')
  return tuple(shape)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """shape = (data, fsdp, tensor); one entry may be -1 (takes the remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(shape, len(devices))
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # odd topologies (or CPU): plain order
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drop mesh axes from dims they do not divide (tiny configs, odd head counts) rather than fail."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    axes_t = axes if isinstance(axes, tuple) else (axes,)
    kept = tuple(a for a in axes_t if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in kept)
    if not kept or dim % size:
      kept = tuple(a for a in kept if dim % mesh.shape[a] == 0)[:1] if kept else ()
    out.append(None if not kept else (kept[0] if len(kept) == 1 else kept))
  return P(*out)


def logical_to_mesh(logical_specs, shapes, mesh: Mesh, rules=LOGICAL_RULES):
  """Logical PartitionSpec tree + matching shape tree -> NamedSharding tree."""
  def one(spec, shape):
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec is not None else P()
    return NamedSharding(mesh, _fit(mesh_spec, getattr(shape, 'shape', shape), mesh))
  return jax.tree.map(one, logical_specs, shapes, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dim over data+fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=LOGICAL_RULES):
  """Context for tracing model code so that nn.with_logical_constraint maps onto `mesh`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
