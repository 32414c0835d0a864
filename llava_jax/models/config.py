"""Model configuration: plain frozen dataclasses (the models import nothing from configs/ or training)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

PROJECTORS = ('linear', 'mlp2x_gelu', 'identity')
FEATURE_SELECTS = ('patch', 'cls_patch')
# Rematerialisation policy -> what the backward pass keeps (a `jax.checkpoint_policies` name; 'none': no remat).
REMAT_POLICIES = {'none': None, 'full': 'nothing_saveable', 'dots': 'checkpoint_dots',
                  'dots_no_batch': 'dots_with_no_batch_dims_saveable'}
DTYPES = ('float32', 'bfloat16', 'float16')
# Decoder families: one LLaMA-style block; what differs is data (qkv biases, sliding window, rope scaling).
MODEL_TYPES = ('llama', 'mistral', 'qwen2')
ROPE_TYPES = ('default', 'llama3')


def _check(cond: bool, msg: str):
  if not cond:
    raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """CLIP ViT vision tower (defaults: ViT-L/14 at 224 px)."""
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  patch_size: int = 14
  image_size: int = 224
  layer_norm_eps: float = 1e-5
  feature_layer: int = -2  # HF hidden_states index: -2 = output of the second-to-last block
  feature_select: str = 'patch'

  def __post_init__(self):
    _check(self.feature_select in FEATURE_SELECTS,
           f'vision.feature_select={self.feature_select!r}; allowed: {FEATURE_SELECTS}')
    _check(self.image_size % self.patch_size == 0,
           f'vision.image_size={self.image_size} is not a multiple of vision.patch_size={self.patch_size}')
    _check(self.hidden_size % self.num_heads == 0,
           f'vision.hidden_size={self.hidden_size} not divisible by vision.num_heads={self.num_heads}')
    _check(1 <= self.num_layers_used <= self.num_layers,
           f'vision.feature_layer={self.feature_layer} out of range for {self.num_layers} layers')

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_image_tokens(self) -> int:
    return self.num_patches + (1 if self.feature_select == 'cls_patch' else 0)

  @property
  def num_layers_used(self) -> int:
    """Blocks actually computed: HF hidden_states has num_layers+1 entries (index 0 = pre_layrnorm output)."""
    idx = self.feature_layer if self.feature_layer >= 0 else self.num_layers + 1 + self.feature_layer
    return idx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """LLaMA-style decoder (defaults: Vicuna-7B v1.5). Families (`model_type`):
  llama   LLaMA 1/2/3, Vicuna; Llama-3.1 adds rope_type='llama3' (frequency-dependent RoPE scaling)
  mistral attention limited to the last `sliding_window` positions (None: full attention, Mistral v0.2+)
  qwen2   biases on q/k/v (HF hard-codes them), tied embeddings at 0.5B/1.5B
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: Optional[int] = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  model_type: str = 'llama'
  sliding_window: Optional[int] = None
  # rope_type='llama3' (HF rope_parameters of Llama-3.1): the rope_* fields below are its parameters.
  rope_type: str = 'default'
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192

  def __post_init__(self):
    _check(self.model_type in MODEL_TYPES, f'text.model_type={self.model_type!r}; allowed: {MODEL_TYPES}')
    _check(self.rope_type in ROPE_TYPES, f'text.rope_type={self.rope_type!r}; allowed: {ROPE_TYPES}')
    _check(self.sliding_window is None or (self.model_type == 'mistral' and self.sliding_window > 0),
           f'text.sliding_window={self.sliding_window}: a positive window, only with model_type=mistral')
    _check(self.num_heads % self.num_kv_heads == 0,
           f'text.num_heads={self.num_heads} not a multiple of text.num_kv_heads={self.num_kv_heads}')
    if self.head_dim is None:
      _check(self.hidden_size % self.num_heads == 0,
             f'text.hidden_size={self.hidden_size} not divisible by text.num_heads={self.num_heads}')

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def qkv_bias(self) -> bool:
    return self.model_type == 'qwen2'


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  vision: VisionConfig = VisionConfig()
  text: LlamaConfig = LlamaConfig()
  projector: str = 'mlp2x_gelu'
  image_token_id: int = 32000
  dtype: str = 'float32'        # compute dtype of matmuls; norms, softmax and the loss stay fp32
  param_dtype: str = 'float32'  # storage dtype of freshly initialised params
  remat_policy: str = 'none'    # rematerialisation of decoder / encoder blocks
  # The original release's image token layouts (its config.json keys; the model itself only splices features at
  # image_token_id): `<im_start>` + image + `<im_end>`, and `<im_patch>` as the image token instead of `<image>`.
  mm_use_im_start_end: bool = False
  mm_use_im_patch_token: bool = False

  def __post_init__(self):
    _check(self.projector in PROJECTORS, f'projector={self.projector!r}; allowed: {PROJECTORS}')
    _check(self.remat_policy in REMAT_POLICIES,
           f'remat_policy={self.remat_policy!r}; allowed: {tuple(REMAT_POLICIES)}')
    _check(self.dtype in DTYPES, f'dtype={self.dtype!r}; allowed: {DTYPES}')
    _check(self.param_dtype in DTYPES, f'param_dtype={self.param_dtype!r}; allowed: {DTYPES}')
    _check(0 <= self.image_token_id < self.text.vocab_size,
           f'image_token_id={self.image_token_id} outside the vocabulary (text.vocab_size={self.text.vocab_size})')
    if self.projector == 'identity':
      _check(self.vision.hidden_size == self.text.hidden_size,
             'projector=identity needs vision.hidden_size == text.hidden_size')

  @property
  def num_image_tokens(self) -> int:
    return self.vision.num_image_tokens

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'LlavaConfig':
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    _check(not unknown, f'unknown model config keys {sorted(unknown)}; allowed: {sorted(known)}')
    for key, sub in (('vision', VisionConfig), ('text', LlamaConfig)):
      if key in d and not isinstance(d[key], sub):
        v = dict(d[key])
        sub_known = {f.name for f in dataclasses.fields(sub)}
        bad = set(v) - sub_known
        _check(not bad, f'unknown model.{key} keys {sorted(bad)}; allowed: {sorted(sub_known)}')
        d[key] = sub(**v)
    return cls(**d)

  def replace(self, **kw) -> 'LlavaConfig':
    return dataclasses.replace(self, **kw)
