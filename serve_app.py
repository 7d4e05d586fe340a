"""The OpenAI-compatible endpoint on Ray Serve.

    serve run serve_app:app                                  # embedded SmolLM2-135M-Instruct on CPU
    serve run serve_app:build_app model=/models/llama tp=1   # builder args: engine and serving fields
    serve run configs/serve_default.yaml                     # a Serve config file

Routes: /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics.
"""
from engine.serve.builder import build_app

app = build_app({})

__all__ = ["app", "build_app"]
