#!/usr/bin/env bash
# The whole test suite on a fresh clone: venv + CPU torch + memnb[dev], notebooks/library sync check, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
nbdev-clean
nbdev-export
if [ -n "$(git status --porcelain -uno -- nbs memnb)" ]; then
  git status --short -uno -- nbs memnb
  echo "FAIL: notebooks and library are out of sync (or notebooks are not clean): run nbdev-clean && nbdev-export and commit"
  exit 1
fi
# Build the compiled ops once before the (parallel) test workers start, so they don't race on the JIT build.
python -c 'import memnb.ops as o; print("memnb.ops backend:", o.backend("embedding_bag_wsum"))'
python -m pytest -n "${PYTEST_WORKERS:-2}" -p no:cacheprovider "$@" tests
