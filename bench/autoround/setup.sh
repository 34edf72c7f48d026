#!/usr/bin/env bash
# Build an isolated venv for the AutoRound baseline (kept apart from the project's
# .venv so auto-round and its dependencies never leak into crossblock's environment).
# Idempotent: re-running only re-checks the pins.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PY="${PYTHON:-python3}"

TORCH_PIN="torch==2.13.0"             # CPU wheel on local disk; unpinned torch would pull CUDA
AUTOROUND_PIN="auto-round==0.16.1"
TRANSFORMERS_PIN="transformers==5.23.0"  # same as the crossblock venv, so both load models alike
ACCELERATE_PIN="accelerate==1.15.0"      # auto-round imports it on the model-loading path
CT_PIN="compressed-tensors==0.20.1"      # auto-round's llm_compressor export (FP4 rows); crossblock's own pin

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# The machine's pip config lists local index folders that lack most packages; pip
# warns once per package about them. Drop that noise, keep pip's exit status.
pip_install() {
    { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1; } \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

# torch first: with it already satisfied, auto-round's bare "torch" requirement
# cannot make pip pick a different (CUDA) build.
pip_install "$TORCH_PIN"
pip_install "$TORCH_PIN" "$AUTOROUND_PIN" "$TRANSFORMERS_PIN" "$ACCELERATE_PIN" "$CT_PIN"

"$VENV/bin/python" - <<'PY'
import torch, transformers, auto_round
assert not torch.version.cuda, "expected a CPU-only torch build"
print("autoround venv ready: torch", torch.__version__, "transformers", transformers.__version__,
      "auto-round", auto_round.__version__)
PY
