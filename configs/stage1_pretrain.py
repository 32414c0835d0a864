"""Stage 1, feature alignment (LLAVA.md §6): train only the projector on image-caption pairs, 1 epoch.

  python -m llava_jax.train --config configs/stage1_pretrain.py:llava15_7b --workdir runs/llava15_7b_stage1 \
      --config.data.train_dir=data/tfds --config.data.tokenizer=hf/vicuna-7b-v1.5 \
      --config.init.vision_from=hf/clip-vit-large-patch14-336 --config.init.llm_from=hf/vicuna-7b-v1.5

Variants (arg): llava_7b, llava_13b (LLaVA: CC-595K, linear projector, lr 2e-3, batch 128),
llava15_7b, llava15_13b (LLaVA-1.5: LCS-558K, mlp2x_gelu projector, lr 1e-3, batch 256), the LLaVA-1.5 recipe on
other LLMs (FAMILY_PRESETS: llava_mistral_7b, llava_llama3_8b, llava_llama31_8b, llava_qwen2_{0_5b,1_5b,7b}),
tiny (tests).
The result `<workdir>/model` is what stage 2 takes as `init.projector_from`. Args `im_start_end=true` /
`im_patch_token=true`: the original's mm_use_im_start_end / mm_use_im_patch_token layouts (with start/end tokens
the input embeddings train too, as in the original).

Packed rows (data.packing; `--config.data.packing=False` for the original's one sample per row): each caption
sample is ~600 tokens (576 image tokens + a short caption), so rows of 2048 would hold 3 and leave ~12% padding;
rows of 3072 hold 5 with 5 image slots (bench/epoch.py on the LCS-558K-like distribution: 5.00 samples per row,
3.1% padding, no unused slot). global_batch_size then counts rows: 48 rows x 5 = 240 samples per update for the
paper's 256 (24 x 5 = 120 for 128). Samples are still cut at max_length 2048 (none of these comes near it).
"""
from configs import common

RECIPE = {
    # variant: (model preset, lr, global batch in samples (the paper's), packed rows per update)
    'llava_7b': ('llava_7b', 2e-3, 128, 24),
    'llava_13b': ('llava_13b', 2e-3, 128, 24),
    'llava15_7b': ('llava15_7b', 1e-3, 256, 48),
    'llava15_13b': ('llava15_13b', 1e-3, 256, 48),
    'tiny': ('tiny', 1e-3, 8, None),   # tests: unpacked
    **{name: (name, 1e-3, 256, 48) for name in common.FAMILY_PRESETS},
}
PACKED_ROW_LENGTH, PACKED_IMAGES_PER_ROW = 3072, 5


def get_config(arg=None):
  a = common.parse_arg(arg, variant='llava15_7b', im_start_end=False, im_patch_token=False)
  if a['variant'] not in RECIPE:
    raise ValueError(f'variant {a["variant"]!r}; allowed: {sorted(RECIPE)}')
  preset, lr, batch, rows = RECIPE[a['variant']]
  c = common.stage_config(preset)
  c.data.template = 'plain'          # <image> + caption (LLAVA.md §2); the same for LLaVA and LLaVA-1.5
  c.data.global_batch_size = batch
  if rows:
    c.data.packing, c.data.global_batch_size = True, rows
    c.data.row_length, c.data.max_images_per_row = PACKED_ROW_LENGTH, PACKED_IMAGES_PER_ROW
  c.data.num_epochs = 1
  c.train.trainable = common.STAGE1_TRAINABLE
  common.image_layout(c, a['im_start_end'], a['im_patch_token'])
  if a['im_start_end']:
    c.train.trainable = common.STAGE1_IM_START_END_TRAINABLE
  c.optim.lr = lr
  c.optim.warmup_ratio = 0.03
  c.checkpoint.every_steps = 500
  if a['variant'] == 'tiny':
    c.data.max_length = 64
    c.mesh.shape = (1, -1, 1)
  return c
