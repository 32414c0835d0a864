"""PEFT LoRA adapters out and in: `adapter_config.json` + `adapter_model.safetensors`, as peft 0.21 saves them for
a transformers 5.x `LlavaForConditionalGeneration`, so that `peft.PeftModel.from_pretrained(base, DIR)` loads them.

Tensor names: `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] per LoRA'd Linear
(`<module>` in 5.x names, `model.language_model.layers.0.self_attn.q_proj`), and the projector (peft's
`modules_to_save`) as `base_model.model.model.multi_modal_projector.linear_{1,2}.{weight,bias}`. `target_modules`
is a regex naming exactly the LoRA'd Linears, so peft never puts LoRA on the vision tower's q/k/v_proj (the
original's find_all_linear_names returns bare names, which peft also matches inside CLIP). Reading accepts the
4.x names too (`base_model.model.language_model.model.layers...`).

    write_adapter('out/adapter', model_config, params, spec)          # params: ours, factors under params['lora']
    adapter = read_adapter('out/adapter', model_config)               # -> Adapter(spec, lora, projector)
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Optional

import jax
import numpy as np

from llava_jax.convert import layout
from llava_jax.convert.flax_to_hf import projector_tensors
from llava_jax.convert.safetensors_io import TensorOut, read_safetensors, write_one
from llava_jax.models import lora as lora_lib
from llava_jax.models.config import LlavaConfig
from llava_jax.models.lora import LoraSpec
from llava_jax.models.llava import abstract_params

CONFIG = 'adapter_config.json'
WEIGHTS = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
# Hub (4.x) name prefix -> transformers 5.x module name prefix.
HF5 = (('language_model.model.', 'model.language_model.'), ('language_model.lm_head', 'lm_head'),
       (layout.PROJ, 'model.multi_modal_projector.'))


class AdapterMismatch(ValueError):
  """The adapter was made for another base model (shapes or target modules) or another LoRA config."""


@dataclasses.dataclass
class Adapter:
  spec: LoraSpec       # r and alpha from the adapter; targets: exactly its LoRA'd kernels
  lora: Any            # our factor tree (the `params['lora']` subtree), numpy fp32
  projector: Any       # our projector subtree, or None when the adapter has none


def _hf5(hub: str) -> str:
  for old, new in HF5:
    if hub.startswith(old):
      return new + hub[len(old):]
  return hub


def _kernel_entries(config: LlavaConfig, shapes: dict) -> dict[tuple, layout.Entry]:
  """(our kernel path, layer) -> the layout entry of its HF Linear weight."""
  return {(e.path, e.layer): e for e in layout.text_entries(config.text, shapes) if e.path[-1] == 'kernel'}


def check_matches(adapter: Adapter, spec: LoraSpec, lora_shapes, where: str) -> None:
  """The adapter must have the configured rank and LoRA exactly the kernels that `spec.targets` names."""
  if adapter.spec.rank != spec.rank:
    raise AdapterMismatch(f'{where}: the adapter has r {adapter.spec.rank}, train.lora.r is {spec.rank}')
  ours = set(lora_lib.factor_paths({lora_lib.COLLECTION: lora_shapes}))
  theirs = set(lora_lib.factor_paths({lora_lib.COLLECTION: adapter.lora}))
  if ours != theirs:
    raise AdapterMismatch(f'{where}: the adapter LoRAs {sorted(theirs - ours)[:3] or "no other kernels"} beyond '
                          f'train.lora.targets={spec.targets!r} and lacks {sorted(ours - theirs)[:3] or "none"}')


def write_adapter(out_dir: str, config: LlavaConfig, params, spec: LoraSpec,
                  log: Optional[Callable[[str], None]] = None) -> str:
  """Write the PEFT adapter of `params` (ours; factors under params['lora'], the trained projector beside them)."""
  log = log or (lambda s: None)
  host = lambda x: np.asarray(jax.device_get(x), np.float32)
  flat = layout.leaf_shapes(abstract_params(config))  # the base's shapes: `params` may hold only what trained
  entries = _kernel_entries(config, flat)
  factors = lora_lib.factor_paths(params)
  tensors, modules = [], []
  for kernel, prefix in sorted(factors.items()):
    path = tuple(kernel.split('/'))
    a = host(layout.get_path(params, tuple(prefix.split('/')) + ('a',)))
    b = host(layout.get_path(params, tuple(prefix.split('/')) + ('b',)))
    lead, n_in, _ = lora_lib.kernel_dims(flat[path], a.shape, b.shape)
    layers = range(a.shape[0]) if lead else [None]
    for i in layers:
      module = _hf5(entries[(path, i)].hf[:-len('.weight')])
      ai, bi = (a, b) if i is None else (a[i], b[i])
      tensors += [TensorOut(f'{PREFIX}{module}.lora_A.weight', (ai.shape[-1], ai[..., 0].size), np.dtype(np.float32),
                            lambda ai=ai, n=n_in: layout.to_hf(f'dense{n}', ai)),
                  TensorOut(f'{PREFIX}{module}.lora_B.weight', (bi[0].size, bi.shape[0]), np.dtype(np.float32),
                            lambda bi=bi: layout.to_hf('dense1', bi))]
      modules.append(module)
  proj = projector_tensors(config, lambda p: host(layout.get_path(params, p)), np.dtype(np.float32), flat)
  tensors += [dataclasses.replace(t, name=PREFIX + _hf5(t.name)) for t in proj]
  os.makedirs(out_dir, exist_ok=True)
  write_one(os.path.join(out_dir, WEIGHTS), tensors, {'format': 'pt'})
  with open(os.path.join(out_dir, CONFIG), 'w') as f:
    json.dump(adapter_config(spec, modules), f, indent=2)
  log(f'wrote PEFT adapter ({len(modules)} LoRA modules, r {spec.rank}, alpha {spec.alpha:g}, projector) to '
      f'{out_dir}')
  return out_dir


def adapter_config(spec: LoraSpec, modules: list[str]) -> dict:
  """peft's LoraConfig fields that matter for loading (the rest take peft's defaults)."""
  # One alternative per module name with the layer index as \d+: exactly the LoRA'd Linears.
  pattern = sorted({re.sub(r'\\\.\d+\\\.', lambda _: r'\.\d+\.', re.escape(m)) for m in modules})
  return {'peft_type': 'LORA', 'task_type': None, 'r': spec.rank, 'lora_alpha': spec.alpha,
          'lora_dropout': spec.dropout, 'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False,
          'use_dora': False, 'init_lora_weights': True, 'target_modules': '(' + '|'.join(pattern) + ')',
          'modules_to_save': ['multi_modal_projector'], 'inference_mode': True,
          'auto_mapping': {'base_model_class': 'LlavaForConditionalGeneration',
                           'parent_library': 'transformers.models.llava.modeling_llava'}}


def read_adapter(path: str, config: LlavaConfig) -> Adapter:
  """A PEFT adapter dir -> Adapter for the model of `config`; AdapterMismatch names what does not fit."""
  cfg_path, weights = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
  if not (os.path.isfile(cfg_path) and os.path.isfile(weights)):
    raise FileNotFoundError(f'{path} is not a PEFT adapter dir ({CONFIG} + {WEIGHTS})')
  with open(cfg_path) as f:
    raw = json.load(f)
  unsupported = [k for k in ('use_dora', 'use_rslora') if raw.get(k)] + (['bias'] if raw.get('bias', 'none') != 'none'
                                                                            else [])
  if raw.get('peft_type', 'LORA') != 'LORA' or unsupported:
    raise AdapterMismatch(f'{cfg_path}: only plain LoRA adapters are supported (peft_type {raw.get("peft_type")}, '
                          f'{unsupported or "no extras"})')
  refs = read_safetensors(weights)
  shapes = layout.leaf_shapes(abstract_params(config))
  by_hf = {e.hf: e for e in layout.text_entries(config.text, shapes) if e.path[-1] == 'kernel'}
  rank, factors, projector = int(raw['r']), {}, {}
  for name, ref in refs.items():
    rest = name[len(PREFIX):] if name.startswith(PREFIX) else name
    m = re.fullmatch(r'(.+)\.lora_([AB])(?:\.default)?\.weight', rest)
    if m is None:
      projector[layout.canonical_llava(rest)] = ref
      continue
    hub = layout.canonical_llava(m.group(1) + '.weight')
    if hub not in by_hf:
      raise AdapterMismatch(f'{path}: LoRA on {m.group(1)}, which the configured model does not have (its '
                            f'{config.text.num_layers}-layer LLM has q/k/v/o_proj, gate/up/down_proj, lm_head)')
    e = by_hf[hub]
    want = (rank, e.hf_shape[1]) if m.group(2) == 'A' else (e.hf_shape[0], rank)
    if tuple(ref.shape) != want:
      raise AdapterMismatch(f'{path}: {name} has shape {tuple(ref.shape)}, the configured model needs {want} '
                            f'(r {rank}, Linear {e.hf_shape[1]} -> {e.hf_shape[0]}): an adapter for another base')
    factors[(e.path, e.layer, m.group(2))] = (ref, e)
  lora = _factor_tree(factors, shapes, rank, path)
  targets = '|'.join(sorted({re.escape('/'.join(p)) for p, _, _ in factors}))
  spec = LoraSpec(rank=rank, alpha=float(raw['lora_alpha']), dropout=float(raw.get('lora_dropout', 0.0)),
                  targets=targets or '$^')
  return Adapter(spec, lora, _projector_tree(projector, config, shapes, path) if projector else None)


def apply_adapter(params, config: LlavaConfig, path: str):
  """Base params (ours, any placement) + the adapter at `path` -> plain params: every LoRA'd kernel becomes
  W + (alpha / r) A B and the projector is the adapter's (cast to the base's dtypes)."""
  adapter = read_adapter(path, config)
  merged = lora_lib.merge(dict(params, **{lora_lib.COLLECTION: adapter.lora}), adapter.spec.scale)
  if adapter.projector is not None:
    merged['projector'] = jax.tree.map(lambda new, old: jax.numpy.asarray(new, old.dtype), adapter.projector,
                                       params['projector'])
  return merged


def _factor_tree(factors: dict, shapes: dict, rank: int, path: str):
  """{(kernel path, layer, 'A'|'B'): (ref, entry)} -> our factor tree; every layer of a LoRA'd kernel needed."""
  out = {}
  for kernel in sorted({p for p, _, _ in factors}):
    shape = shapes[kernel]
    stacked = ('layers',) == kernel[1:2]
    n_in = int(next(e for (p, _, _), (_, e) in factors.items() if p == kernel).kind[len('dense'):])
    lead = 1 if stacked else 0
    a = np.zeros(shape[:lead + n_in] + (rank,), np.float32)
    b = np.zeros(shape[:lead] + (rank,) + shape[lead + n_in:], np.float32)
    for i in range(shape[0]) if stacked else [None]:
      for which, dst, kind in (('A', a, f'dense{n_in}'), ('B', b, 'dense1')):
        if (kernel, i, which) not in factors:
          raise AdapterMismatch(f'{path}: lora_{which} of {"/".join(kernel)} layer {i} is missing (the adapter '
                                'must cover every layer of a LoRA\'d module)')
        ref, _ = factors[(kernel, i, which)]
        layout.to_flax(kind, ref.load(), dst if i is None else dst[i])
    prefix = (lora_lib.COLLECTION,) + kernel[:-1]
    out['/'.join(prefix + ('a',))], out['/'.join(prefix + ('b',))] = a, b
  from flax import traverse_util
  return traverse_util.unflatten_dict(out, sep='/').get(lora_lib.COLLECTION, {})


def _projector_tree(refs: dict, config: LlavaConfig, shapes: dict, path: str):
  """modules_to_save tensors (hub names) -> our projector subtree (mlp2x_gelu; linear folds HF's two layers)."""
  from llava_jax.convert.hf_to_flax import fold_linear
  entries = layout.projector_entries(config, shapes, fold=config.projector == 'linear')
  missing = [e.hf for e in entries if e.hf not in refs]
  extra = sorted(set(refs) - {e.hf for e in entries})
  if missing or extra:
    raise AdapterMismatch(f'{path}: modules_to_save tensors {extra[:4] or ""} are not the projector of the '
                          f'configured model; missing {missing[:4] or "none"}')
  if config.projector == 'linear':
    p = layout.PROJ
    kernel, bias = fold_linear(*(refs[p + n].load() for n in ('linear_1.weight', 'linear_1.bias', 'linear_2.weight',
                                                              'linear_2.bias')))
    return {'linear_1': {'kernel': kernel.astype(np.float32), 'bias': bias.astype(np.float32)}}
  out: dict = {}
  for e in entries:
    ref = refs[e.hf]
    if tuple(ref.shape) != e.hf_shape:
      raise AdapterMismatch(f'{path}: {e.hf} has shape {tuple(ref.shape)}, the configured projector needs '
                            f'{e.hf_shape}: an adapter for another base')
    dst = np.zeros(shapes[e.path], np.float32)
    layout.to_flax(e.kind, ref.load(), dst)
    out.setdefault(e.path[1], {})[e.path[2]] = dst
  return out
