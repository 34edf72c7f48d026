#!/usr/bin/env bash
# CUDA checks, run on a machine with a GPU from the repository root: the whole test suite with CUDA as
# the default device (bit-identity hashes are CPU figures: those tests are expected to differ there),
# then wall time and GPU memory of `best` and `best` + finetune on a model of SmolLM2-135M's shape.
#   OUT=dir bash bench/gpu_check.sh
# Packages the machine lacks can sit as wheels in .whl/ (installed to /tmp/site); the test model and
# texts are read from $CROSSBLOCK_SHARED (default: .gpushared, a copy of ../shared's stories260k and data).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CROSSBLOCK_SHARED=${CROSSBLOCK_SHARED:-$PWD/.gpushared}
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
timeout "${TEST_SECONDS:-300}" python3 -m pytest tests -n "${WORKERS:-12}" -p no:cacheprovider --timeout 240 \
    --ignore tests/test_tasks.py -rfE --durations 15 2>&1 | tee "$OUT/pytest_cuda.log" | tail -60
timeout "${BENCH_SECONDS:-200}" python3 bench/gpu_shape.py --rows best,best+ft60 --nsamples 128 --seqlen 512 \
    2>&1 | tee "$OUT/gpu_shape.log"
