"""The OpenAI-compatible endpoint on Ray Serve.

    serve run serve_app:app                                  # embedded SmolLM2-135M-Instruct on CPU
    serve run serve_app:build_app model=/models/llama tp=1   # builder args: engine and serving fields
    serve run configs/serve_default.yaml                     # a Serve config file

Routes: /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics.
"""
from engine.serve.ray_env import apply_quiet_ray_env

apply_quiet_ray_env()  # before `serve run` starts Ray: quieter bookkeeping loops (see engine/serve/ray_env.py)

from engine.serve.builder import build_app  # noqa: E402

app = build_app({})

__all__ = ["app", "build_app"]
