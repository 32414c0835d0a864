"""Training: `python -m llava_jax.train --config configs/X.py[:arg] [--config.a.b=v] [--workdir DIR]`.

Files by role: cli.py (the command line: ml_collections config flags, --workdir, distributed flags),
config_checks.py (what the library does not check: ranges, cross-field rules, paths), setup.py (split into
trainable/frozen, optimizer, shardings, the compiled step), step.py (the pure train step and the loss), optim.py,
partition.py (stage masks), init.py (initial params from model directories), resume.py (resumable orbax
checkpoints, SIGTERM), metrics.py + flops.py (progress, JSONL, TensorBoard, MFU), trainer.py (one stage, top to
bottom), dry_run.py (memory per device before a job starts).
"""
