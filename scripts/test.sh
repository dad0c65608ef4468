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
# The browser test drives Debian's Chromium (Playwright cannot download its own browser here).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian's chromium for the browser test..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core) >/dev/null
  else
    echo "NOTE: chromium is missing; the browser test will fail: sudo apt-get install -y chromium fonts-dejavu-core"
  fi
fi
# Build the compiled ops once before the (parallel) test workers start, so they don't race on the JIT build.
python -c 'import memnb.ops as o; print("memnb.ops backend:", o.backend("embedding_bag_wsum"))'
python -m pytest -n "${PYTEST_WORKERS:-2}" -p no:cacheprovider "$@" tests
