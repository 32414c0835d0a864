"""ScienceQA fine-tuning as in the paper (§5.2): from the stage-1 projector, projector + LLM, 12 epochs.

  python -m llava_jax.eval.scienceqa convert --problems sqa/problems.json --image-folder sqa/images --out-dir sqa/llava
  python -m llava_jax.data.build --json train=sqa/llava/scienceqa_train.json --images sqa/images \
      --out data/tfds --name scienceqa
  python -m llava_jax.train --config configs/scienceqa.py:llava_13b --workdir runs/sqa \
      --config.data.train_dir=data/tfds/scienceqa --config.data.tokenizer=hf/vicuna-13b-v1.1 \
      --config.init.projector_from=runs/llava_13b_stage1/model \
      --config.init.vision_from=hf/clip-vit-large-patch14 --config.init.llm_from=hf/vicuna-13b-v1.1

Prompts are QCM -> LEA (LLAVA.md §7), template llava_v1 as the release's finetune_sqa script; lr 2e-5,
batch 32 (4 per GPU on 8 GPUs), 12 epochs. Variants: llava_7b, llava_13b, llava15_7b, llava15_13b, tiny.
"""
from configs import common

PRESETS = ('llava_7b', 'llava_13b', 'llava15_7b', 'llava15_13b', 'tiny')


def get_config(arg=None):
  a = common.parse_arg(arg, variant='llava_13b')
  if a['variant'] not in PRESETS:
    raise ValueError(f'variant {a["variant"]!r}; allowed: {list(PRESETS)}')
  c = common.stage_config(a['variant'])
  c.data.template = 'llava_v1'
  c.data.global_batch_size = 32 if a['variant'] != 'tiny' else 8
  c.data.num_epochs = 12
  c.train.trainable = common.STAGE2_TRAINABLE
  c.optim.lr = 2e-5
  c.optim.warmup_ratio = 0.03
  if a['variant'] == 'tiny':
    c.data.max_length = 64
  return c
