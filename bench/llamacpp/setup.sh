#!/usr/bin/env bash
# Builds llama.cpp's Python binding (llama-cpp-python, compiled from source by pip)
# into its own venv, bench/llamacpp/.venv, so that crossblock's venv stays clean.
# CPU only. Two cores: the compile takes 10-20 minutes; run it under nohup.
#   nohup bash bench/llamacpp/setup.sh > bench/llamacpp/setup.log 2>&1 &
# LLAMA_CPP_PYTHON_VERSION pins a version (default: the one the results were made with).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install -q --upgrade pip
# GGML_NATIVE: build for this CPU; no CUDA/Metal; two jobs so we do not starve others.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_CURL=OFF}"
export MAKEFLAGS="${MAKEFLAGS:--j2}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
"$here/.venv/bin/pip" install --no-cache-dir --verbose "llama-cpp-python==$version" numpy
"$here/.venv/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
