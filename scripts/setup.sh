#!/usr/bin/env bash
# Create (or reuse) the project venv: CPU torch first, then memnb with its dev extras. Sourced by test.sh and main.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
# torch first: the CPU wheel. A bare `torch` requirement would pull a multi-GB CUDA build.
"$PY" -c 'import torch' 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
"$PY" -c 'import torch' # fail here, clearly, if torch did not install
# MEMNB_PIN: extra requirements pinned on top (the CI's lowest-versions venv: "transformers==5.0.0")
"$PY" -m pip install -q --disable-pip-version-check -e ".[dev]" ${MEMNB_PIN:-} 2>&1 | grep -v "is ignored" || true
"$PY" -c 'import memnb, nbdev' # fail here, clearly, if the project did not install
export PATH="$PWD/$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
