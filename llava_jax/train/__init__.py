"""Training: `python -m llava_jax.train --config configs/X.py[:arg] [--config.a.b=v] [--workdir DIR]`.

Files by role: setup.py (split into trainable/frozen, optimizer, shardings, the compiled step), step.py (the pure
train step and the loss), optim.py, partition.py (stage masks), init.py (initial params from checkpoints),
resume.py (resumable orbax checkpoints, SIGTERM), metrics.py + flops.py (progress, JSONL, TensorBoard,
MFU), trainer.py (one stage, top to bottom), run.py (pipelines: the demo), demo.py (the demo's data).
"""
