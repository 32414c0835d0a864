"""LLaVA-1.5 7B / 13B, stage 1 or 2, sized for 8x H100-80GB or a TPU v5p-32 slice (16 chips, 95 GiB each).

  python -m llava_jax.train --config configs/scale.py:7b_stage2_8xh100 --dry_run      # does it fit? (any machine)
  sbatch --nodes=1 launch/slurm_gpu.sbatch configs/scale.py:7b_stage2_8xh100 \
      --config.data.train_dir=data/mix665k --config.data.tokenizer=hf/vicuna-7b-v1.5 \
      --config.init.projector_from=runs/7b_stage1/model \
      --config.init.vision_from=hf/clip-vit-large-patch14-336 --config.init.llm_from=hf/vicuna-7b-v1.5
  launch/tpu_pod.sh configs/scale.py:13b_stage1_v5p32 ...

Arg: `{SIZE}_stage{1,2}_{8xh100,v5p32}`, SIZE one of 7b, 13b (LLaVA-1.5, Vicuna) or a family preset without its
`llava_` prefix: mistral_7b, llama3_8b, llama31_8b, qwen2_0_5b, qwen2_1_5b, qwen2_7b. The recipe (data, optimizer,
batch) is stage1_pretrain.py / stage2_finetune.py's llava15_* (or llava_SIZE) variant unchanged; this file adds
the mesh (FSDP over every device), the micro-batching and remat policy that the dry run found to fit (table in
README), and the `hardware` section the dry run judges against.
"""
import re

import ml_collections

from configs import common, stage1_pretrain, stage2_finetune

TARGETS = {
    # name, devices, HBM per device (GiB), dense bf16 TFLOP/s per device
    '8xh100': ('8x H100-80GB', 8, 80.0, 989.0),
    'v5p32': ('TPU v5p-32 (16 chips)', 16, 95.0, 459.0),
}
FAMILIES = tuple(name[len('llava_'):] for name in common.FAMILY_PRESETS)
# (model, stage, target) -> (train.grad_accum_steps, model.remat_policy): the least micro-batching with which
# `--dry_run` puts the step under 75% of HBM (a margin for GPU/TPU compilers deciding differently from the CPU one
# the dry run compiles with); full remat throughout, as the original's gradient checkpointing. README has the table.
FIT = {
    ('7b', 1, '8xh100'): (2, 'full'),
    ('7b', 2, '8xh100'): (2, 'full'),
    ('13b', 1, '8xh100'): (4, 'full'),
    ('13b', 2, '8xh100'): (4, 'full'),
    ('7b', 1, 'v5p32'): (1, 'full'),
    ('7b', 2, 'v5p32'): (1, 'full'),
    ('13b', 1, 'v5p32'): (1, 'full'),
    ('13b', 2, 'v5p32'): (1, 'full'),
    # LLaVA-1.5 recipe on other LLMs (the 128K / 152K vocabularies' logits are what needs micro-batching).
    **{(size, 2, '8xh100'): (2, 'full') for size in FAMILIES},
    **{(size, 2, 'v5p32'): (1, 'full') for size in FAMILIES},
    **{(size, 1, '8xh100'): (2 if size == 'mistral_7b' else 4, 'full') for size in FAMILIES},
    **{(size, 1, 'v5p32'): (2 if size in ('llama3_8b', 'llama31_8b', 'qwen2_7b') else 1, 'full') for size in FAMILIES},
}
ARG = re.compile(rf'(7b|13b|{"|".join(FAMILIES)})_stage([12])_(8xh100|v5p32)')


def get_config(arg='7b_stage2_8xh100'):
  m = ARG.fullmatch(arg or '')
  if not m:
    raise ValueError(f'config arg {arg!r}; expected {{7b,13b,{",".join(FAMILIES)}}}_stage{{1,2}}_'
                     f'{{{",".join(TARGETS)}}}, e.g. 7b_stage2_8xh100')
  size, stage, target = m.group(1), int(m.group(2)), m.group(3)
  recipe = stage1_pretrain if stage == 1 else stage2_finetune
  variant = f'llava15_{size}' if size in ('7b', '13b') else f'llava_{size}'
  c = recipe.get_config(variant)
  # FIT below was sized with --dry_run on the paper's rows (one sample per row of 2048, its global batch);
  # the recipes' packed rows put other token counts on a device: re-size with --dry_run before packing here.
  c.data.packing, c.data.global_batch_size = False, recipe.RECIPE[variant][2]
  name, devices, hbm, tflops = TARGETS[target]
  accum, remat = FIT[(size, stage, target)]
  c.mesh.shape = (1, devices, 1)  # FSDP: params, gradients and optimizer state split over every device
  c.train.grad_accum_steps = accum
  c.model.remat_policy = remat
  c.log.peak_tflops = tflops
  with c.unlocked():
    c.hardware = ml_collections.ConfigDict(dict(name=name, devices=devices, hbm_gib=hbm))
  return c
