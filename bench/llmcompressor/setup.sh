#!/usr/bin/env bash
# Build an isolated venv for the llm-compressor baseline (its pins differ from crossblock's:
# transformers <= 5.17, compressed-tensors 0.19.0). Idempotent.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
pip_install() {
    { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1; } \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_install "torch==2.13.0"   # CPU wheel first, so llm-compressor's torch requirement is met
pip_install "torch==2.13.0" "llmcompressor==0.14.0.1" "transformers==5.17.0" "compressed-tensors==0.19.0"
"$VENV/bin/python" -c "import llmcompressor, transformers, compressed_tensors, torch; print('llmcompressor', llmcompressor.__version__, 'transformers', transformers.__version__, 'compressed-tensors', compressed_tensors.__version__, 'torch', torch.__version__)"
