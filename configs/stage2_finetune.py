"""Stage 2, end-to-end fine-tuning (LLAVA.md §6): projector + LLM train, the vision encoder stays frozen.

  python -m llava_jax.train --config configs/stage2_finetune.py:llava15_7b --workdir runs/llava15_7b_stage2 \
      --config.data.train_dir=data/tfds --config.data.tokenizer=hf/vicuna-7b-v1.5 \
      --config.init.projector_from=runs/llava15_7b_stage1/model \
      --config.init.vision_from=hf/clip-vit-large-patch14-336 --config.init.llm_from=hf/vicuna-7b-v1.5

Variants (arg): llava_7b, llava_13b (LLaVA: Instruct-158K, 3 epochs, batch 128 as in the release scripts;
the paper used 32), llava15_7b, llava15_13b (LLaVA-1.5: mix665k, 1 epoch, batch 128, images padded to square,
length grouping), the LLaVA-1.5 recipe on other LLMs (common.FAMILY_PRESETS, each with its LLM's chat template),
tiny (tests). Args im_start_end / im_patch_token as in stage1_pretrain.py. All: lr 2e-5, cosine, warmup 0.03,
template vicuna_v1 unless the LLM has its own.
`<variant>_lora` (e.g. llava15_7b_lora, llava15_13b_lora, tiny_lora): the original's finetune_lora.sh: LoRA r 128,
alpha 256, dropout 0.05 on every Linear of the LLM but lm_head, lr 2e-4, projector lr 2e-5; the projector trains
fully, every base weight stays frozen. QLoRA: add --config.train.lora.base_bits=4 (or 8).

Packed rows (data.packing; `--config.data.packing=False` for the original's one sample per row): rows of 5120
tokens with 6 image slots; on the mix665k-like distribution of bench/epoch.py that is 5.82 samples per row, 4.9%
padding and 8.6% unused image slots. Rows of 4096 x 5 cannot meet both 5% and 10%: that mix has ~888 tokens per
image, so 4096 tokens hold 4.6 images on average and 5 slots stay >= 7.8% unused even with no padding (measured:
5.3% padding, 12.6% unused; rows of 2048 x 3: 2 samples per row, 17% padding). global_batch_size then counts
rows: 24 rows x 5.82 = ~140 samples per update for the paper's 128 (24 divides 8 devices; 22 rows would give
128). Samples are still cut at max_length 2048.
"""
from configs import common

RECIPE = {
    # variant: (model preset, epochs, global batch in samples (the paper's), image aspect, group by length,
    #           packed rows per update)
    'llava_7b': ('llava_7b', 3, 128, 'square', False, 24),
    'llava_13b': ('llava_13b', 3, 128, 'square', False, 24),
    'llava15_7b': ('llava15_7b', 1, 128, 'pad', True, 24),
    'llava15_13b': ('llava15_13b', 1, 128, 'pad', True, 24),
    'tiny': ('tiny', 1, 8, 'square', False, None),   # tests: unpacked
    **{name: (name, 1, 128, 'pad', True, 24) for name in common.FAMILY_PRESETS},
}
PACKED_ROW_LENGTH, PACKED_IMAGES_PER_ROW = 5120, 6


def get_config(arg=None):
  a = common.parse_arg(arg, variant='llava15_7b', im_start_end=False, im_patch_token=False)
  variant = a['variant']
  lora = variant.endswith('_lora')
  variant = variant[:-len('_lora')] if lora else variant
  if variant not in RECIPE:
    raise ValueError(f'variant {a["variant"]!r}; allowed: {sorted(RECIPE)}, each also with _lora')
  preset, epochs, batch, aspect, group, rows = RECIPE[variant]
  c = common.stage_config(preset)
  c.data.template = common.FAMILY_PRESETS.get(preset, 'vicuna_v1')  # Vicuna's; llava_llama_2 for LLaMA-2-chat
  c.data.global_batch_size = batch
  if rows:
    c.data.packing, c.data.global_batch_size = True, rows
    c.data.row_length, c.data.max_images_per_row = PACKED_ROW_LENGTH, PACKED_IMAGES_PER_ROW
  c.data.num_epochs = epochs
  c.data.image_aspect = aspect
  c.data.group_by_length = group
  c.train.trainable = common.STAGE2_TRAINABLE
  common.image_layout(c, a['im_start_end'], a['im_patch_token'])
  c.optim.lr = 2e-5
  c.optim.warmup_ratio = 0.03
  if lora:
    c.train.trainable = common.LORA_TRAINABLE
    c.train.lora.update(dict(r=128, alpha=256.0, dropout=0.05))
    c.optim.lr = 2e-4
    c.optim.projector_lr = 2e-5
  if variant == 'tiny':
    c.data.max_length = 64
    if lora:  # r 128 exceeds the tiny model's widths
      c.train.lora.update(dict(r=4, alpha=8.0))
  return c
