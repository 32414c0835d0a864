"""Training configs (`get_config(arg)` -> ml_collections.ConfigDict); run with `python -m llava_jax.train --config`."""
