"""The built-in demo: LLaVA's two stages on a synthetic shapes dataset, on a CPU in minutes (configs/demo.py).

  python -m llava_jax.demo --config configs/demo.py [--workdir DIR] [--config.KEY=VALUE ...]

Everything that exists only for the demo: the dataset (synthetic.py), its preparation (data.py), the vision
warm-up that stands in for CLIP's pretraining (vision_warmup.py), the held-out QA scoring (qa.py) and the pipeline
that runs them around ordinary training stages (pipeline.py). It imports train/, data/ and the models; nothing
outside imports it.
"""
