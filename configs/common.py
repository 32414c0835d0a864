"""Defaults shared by every training config: the one place they are written down.

A stage config starts from `stage_config()` (locked: a misspelt key fails where it is set) and changes what its
recipe needs. Every key has the type of its default (optional values are typed placeholders), which the
`--config.KEY=VALUE` overrides of ml_collections.config_flags keep; `llava_jax/train/config_checks.py` checks the
ranges and the rules between keys at start-up.
"""
from __future__ import annotations

import dataclasses
import typing

import ml_collections
from ml_collections.config_dict import placeholder

from llava_jax.models import presets

# Stage masks (LLAVA.md §6): first matching regex over '/'-joined param paths decides.
STAGE1_TRAINABLE = (('projector/.*', True), ('.*', False))
# With <im_start>/<im_end> (model.mm_use_im_start_end) the original's stage 1 also trains the input embeddings (the
# output embeddings stay frozen): initialize_vision_tokenizer with tune_mm_mlp_adapter.
STAGE1_IM_START_END_TRAINABLE = (('projector/.*', True), ('language_model/embed_tokens/.*', True), ('.*', False))
STAGE2_TRAINABLE = (('projector/.*', True), ('language_model/.*', True), ('.*', False))
ALL_TRAINABLE = (('.*', True),)
# LLaVA on today's LLMs: model preset -> the chat template its LLM was tuned with (stage 2).
FAMILY_PRESETS = {'llava_mistral_7b': 'mistral_instruct', 'llava_llama3_8b': 'llama_3', 'llava_llama31_8b': 'llama_3',
                  'llava_qwen2_0_5b': 'qwen_2', 'llava_qwen2_1_5b': 'qwen_2', 'llava_qwen2_7b': 'qwen_2'}
# LoRA (train.lora.r > 0): the factors and the projector train, every base weight stays frozen.
LORA_TRAINABLE = (('lora/.*', True), ('projector/.*', True), ('.*', False))
# The original's find_all_linear_names: every Linear of the LLM except lm_head (q/k/v/o, gate/up/down).
LORA_TARGETS = 'language_model/layers/.+/kernel'


def parse_arg(arg, **defaults):
  """'llava15_7b' or 'variant=llava15_7b,steps=10' -> dict over `defaults` (values keep the defaults' types)."""
  out = dict(defaults)
  if not arg:
    return out
  for i, item in enumerate(arg.split(',')):
    key, sep, value = item.partition('=')
    if not sep:  # a bare word sets the first key
      key, value = next(iter(defaults)), item
    if key not in defaults:
      raise KeyError(f'config arg {key!r} unknown; allowed: {sorted(defaults)}')
    kind = type(defaults[key])
    out[key] = (value.lower() in ('1', 'true')) if kind is bool else kind(value)
  return out


def model_config(preset: str, **overrides) -> ml_collections.ConfigDict:
  """The model section: every LlavaConfig field of a preset, so that `--config.model.text.num_layers=4` works."""
  return _section(presets.get_model_config(preset, **overrides))


def _section(obj) -> ml_collections.ConfigDict:
  """A model dataclass as a ConfigDict; a None field becomes a placeholder of its annotated type."""
  hints = typing.get_type_hints(type(obj))
  out = {}
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value):
      value = _section(value)
    elif value is None:  # Optional[T] -> placeholder(T)
      value = placeholder(next(t for t in typing.get_args(hints[f.name]) if t is not type(None)))
    out[f.name] = value
  return ml_collections.ConfigDict(out)


def image_layout(c: ml_collections.ConfigDict, im_start_end: bool, im_patch_token: bool) -> None:
  """The original release's image token layouts (config args `im_start_end`, `im_patch_token`)."""
  c.model.mm_use_im_start_end = im_start_end
  c.model.mm_use_im_patch_token = im_patch_token


def stage_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = placeholder(str)   # default: workdir/<config file name>; `--workdir` overrides
  c.model = model_config(preset, dtype='bfloat16', remat_policy='full')

  # Mesh (data, fsdp, tensor); -1 takes the remaining devices. Default: FSDP over all of them.
  c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1)))

  c.data = ml_collections.ConfigDict(dict(
      train_dir=placeholder(str),    # a dataset built by `python -m llava_jax.data.build`
      split='train',
      tokenizer=placeholder(str),    # HF tokenizer dir or an exported model dir (its tokenizer/)
      template='plain',
      max_length=2048,               # model_max_length of the original scripts
      image_aspect='square',
      global_batch_size=128,
      num_epochs=1,
      shuffle=True,
      group_by_length=False,
      # Packing: several samples per row of max_length (segment ids, positions restarting per sample); then
      # global_batch_size counts ROWS per update, and samples per update = rows x samples per row (logged).
      packing=False,
      row_length=placeholder(int),   # tokens per packed row; default max_length (which still cuts each sample)
      max_images_per_row=3,          # image slots of a packed row: each costs a vision-tower pass, used or not
      worker_count=0,
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=-1,                      # -1: as many as num_epochs of the data give
      trainable=STAGE1_TRAINABLE,
      grad_accum_steps=1,
      nan_policy='stop',             # 'stop': raise naming the step; 'skip': drop that update and go on
      max_skipped_steps=10,          # with 'skip', stop after this many non-finite steps in a row
      # LoRA (llava_jax/models/lora.py): r = 0 off. targets: regex over kernel paths (the LLM's only).
      # base_bits 8 | 4: the frozen targeted kernels stored int8 | nf4 (QLoRA); 0: in the compute dtype.
      lora=ml_collections.ConfigDict(dict(r=0, alpha=16.0, dropout=0.0, targets=LORA_TARGETS, base_bits=0)),
  ))

  # HF Trainer defaults as used by the original scripts (AdamW, betas 0.9/0.999, eps 1e-8, max_grad_norm 1).
  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-3, projector_lr=placeholder(float), weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
      warmup_ratio=0.03, schedule='cosine', clip_norm=1.0,
  ))

  c.init = ml_collections.ConfigDict(dict(
      model_from=placeholder(str),      # a whole model: exported dir or HF LLaVA dir
      projector_from=placeholder(str),  # stage-1 export (the original's --pretrain_mm_mlp_adapter)
      vision_from=placeholder(str),     # HF CLIP dir or an exported model dir
      llm_from=placeholder(str),        # HF LLaMA/Vicuna dir or an exported model dir
      allow_random_frozen=False,        # a frozen module nobody initialises is an error unless this is set
      adapter_dir=placeholder(str),     # a PEFT LoRA adapter dir (its factors and projector), with train.lora.r
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=2, async_save=True))
  # hf_dir: the HF LLaVA, LoRA merged in; peft_dir: a PEFT adapter (LoRA factors + projector) for the HF base.
  c.export = ml_collections.ConfigDict(dict(model=True, hf_dir=placeholder(str), peft_dir=placeholder(str)))
  c.log = ml_collections.ConfigDict(dict(every_steps=10, peak_tflops=placeholder(float), tensorboard=True))
  c.lock()
  return c
