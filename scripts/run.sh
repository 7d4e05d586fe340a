#!/usr/bin/env bash
# Set up a fresh clone (if needed) and run the main job: the OpenAI-compatible endpoint on Ray Serve,
# serving the embedded SmolLM2-135M-Instruct on CPU at http://127.0.0.1:8000/v1 (Ctrl-C stops it).
# With no arguments it is `serve run serve_app:app`; a Serve config file runs that instead
# (scripts/run.sh configs/serve_default.yaml), and key=value arguments are builder args
# (scripts/run.sh gguf_weights=native max_replicas=1 is `serve run serve_app:build_app ...`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAYLM_LOG=${RAYLM_LOG:-INFO}
# Convert the embedded model once, before replicas start (later starts take seconds).
.venv/bin/python -c "from engine.default_model import default_model_dir; print('model:', default_model_dir())"
# Quieter Ray bookkeeping loops on a small host (engine/serve/ray_env.py), for config files as well.
eval "$(.venv/bin/python -m engine.serve.ray_env)"
case "${1:-}" in
  "") exec .venv/bin/serve run serve_app:app ;;
  *.yaml|*.yml) exec .venv/bin/serve run "$@" ;;
  *=*) exec .venv/bin/serve run serve_app:build_app "$@" ;;
  *) exec .venv/bin/serve run "$@" ;;
esac
