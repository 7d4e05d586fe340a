#!/usr/bin/env bash
# Set up a fresh clone (if needed) and run the main job. Until the HTTP endpoint lands (issue 3) this is an
# offline demo: the embedded SmolLM2-135M-Instruct answers a file of prompts, batched on the paged engine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAYLM_LOG=${RAYLM_LOG:-INFO}
exec .venv/bin/python -m engine generate --input configs/demo_prompts.txt --max-new-tokens 96 --temperature 0 --chat "$@"
