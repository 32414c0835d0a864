"""OpenAI-compatible serving: `python -m llava_jax.serve` (engine.py batching, app.py HTTP API, web.py chat)."""
