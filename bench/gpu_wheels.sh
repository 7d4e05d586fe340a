#!/usr/bin/env bash
# Wheels the GPU image lacks (it has torch, triton and transformers, no internet): pydantic and its
# dependencies for CPython 3.10-3.13 on x86_64 Linux, into ./.whl (git-ignored), for bench/gpu_session.sh.
# Run here (PyPI reachable), then carry .whl to the device: run(..., carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
for v in 3.10 3.11 3.12 3.13; do
    "$PY" -m pip download -q --only-binary=:all: --platform manylinux2014_x86_64 --python-version "$v" \
        --implementation cp -d .whl "pydantic==$("$PY" -c 'import pydantic; print(pydantic.VERSION)')"
done
ls .whl
