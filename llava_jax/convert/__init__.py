"""HF weights in and out: CLIP, LLaMA, HF LLaVA (transformers 4.x / 5.x layouts), original-release LLaVA.

    from llava_jax.convert import load_hf_llava
    model, params = load_hf_llava('llava-1.5-7b-hf')        # params: numpy arrays, our tree
    export_hf_llava('out_hf', model.config, params, tokenizer)

CLI: `python -m llava_jax.convert import-hf SRC OUT` / `export-hf SRC OUT` (see --help).
"""
from llava_jax.convert.flax_to_hf import export_hf_llava
from llava_jax.convert.hf_to_flax import (CheckpointMismatchError, load_hf_clip, load_hf_llama, load_hf_llava,
                                          load_original_llava)

__all__ = ['CheckpointMismatchError', 'export_hf_llava', 'load_hf_clip', 'load_hf_llama', 'load_hf_llava',
           'load_original_llava']
