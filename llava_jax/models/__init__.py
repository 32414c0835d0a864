"""Pure Flax models of LLaVA. Nothing here imports data, training or I/O code."""
from llava_jax.models.config import LlamaConfig, LlavaConfig, VisionConfig
from llava_jax.models.llava import (Llava, abstract_params, check_image_tokens, init_cache, init_params,
                                    param_logical_axes)

__all__ = ['LlamaConfig', 'LlavaConfig', 'VisionConfig', 'Llava', 'abstract_params', 'check_image_tokens',
           'init_cache', 'init_params', 'param_logical_axes']
