"""Stage 2, end-to-end fine-tuning (LLAVA.md §6): projector + LLM train, the vision encoder stays frozen.

  python -m llava_jax.train --config configs/stage2_finetune.py:llava15_7b --workdir runs/llava15_7b_stage2 \
      --config.data.train_dir=data/tfds --config.data.tokenizer=hf/vicuna-7b-v1.5 \
      --config.init.projector_from=runs/llava15_7b_stage1/model \
      --config.init.vision_from=hf/clip-vit-large-patch14-336 --config.init.llm_from=hf/vicuna-7b-v1.5

Variants (arg): llava_7b, llava_13b (LLaVA: Instruct-158K, 3 epochs, batch 128 as in the release scripts;
the paper used 32), llava15_7b, llava15_13b (LLaVA-1.5: mix665k, 1 epoch, batch 128, images padded to square,
length grouping), tiny (tests). All: lr 2e-5, cosine, warmup 0.03, template vicuna_v1.
"""
from configs import common

RECIPE = {
    # variant: (model preset, epochs, global batch, image aspect, group by length)
    'llava_7b': ('llava_7b', 3, 128, 'square', False),
    'llava_13b': ('llava_13b', 3, 128, 'square', False),
    'llava15_7b': ('llava15_7b', 1, 128, 'pad', True),
    'llava15_13b': ('llava15_13b', 1, 128, 'pad', True),
    'tiny': ('tiny', 1, 8, 'square', False),
}


def get_config(arg=None):
  a = common.parse_arg(arg, variant='llava15_7b')
  if a['variant'] not in RECIPE:
    raise ValueError(f'variant {a["variant"]!r}; allowed: {sorted(RECIPE)}')
  preset, epochs, batch, aspect, group = RECIPE[a['variant']]
  c = common.stage_config(preset)
  c.data.template = 'vicuna_v1'      # Vicuna's template; use llava_llama_2 for a LLaMA-2-chat LLM
  c.data.global_batch_size = batch
  c.data.num_epochs = epochs
  c.data.image_aspect = aspect
  c.data.group_by_length = group
  c.train.trainable = common.STAGE2_TRAINABLE
  c.optim.lr = 2e-5
  c.optim.warmup_ratio = 0.03
  if a['variant'] == 'tiny':
    c.data.max_length = 64
  return c
