#!/usr/bin/env bash
# The whole test suite on a fresh clone: venv + CPU torch + memnb[dev], notebooks/library sync check, pytest;
# then the model tests again in a second venv pinned to the lowest transformers that pyproject.toml declares.
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
python -c 'import torch, transformers; print("newest window end: torch", torch.__version__, "transformers", transformers.__version__)'
python -m pytest -n "${PYTEST_WORKERS:-2}" -p no:cacheprovider "$@" tests
[ "${MEMNB_SKIP_LOW:-0}" = 1 ] && exit 0
# The low end of the declared window: the transformers-facing tests again on the lowest transformers.
LOW=$(python -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(next(re.search(r">=\s*([\w.]+)", d).group(1) for d in deps if re.match(r"transformers\b", d)))')
echo "lowest declared transformers: $LOW; model tests in .venv-low"
# its own kernel cache: torch's JIT build flags name the venv, so a shared cache would rebuild on every switch
export TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions_low"
VENV=.venv-low MEMNB_PIN="transformers==$LOW" source scripts/setup.sh
python -c 'import memnb.ops as o; print("memnb.ops backend:", o.backend("embedding_bag_wsum"))'
python -c "import torch, transformers; assert transformers.__version__ == '$LOW', transformers.__version__; print('low window end: torch', torch.__version__, 'transformers', transformers.__version__)"
python -m pytest -n "${PYTEST_WORKERS:-2}" -p no:cacheprovider "$@" tests/test_notebooks.py tests/test_retention.py tests/test_cli.py \
  -k "03a_hf or 03b_lora or 03c_checkpoint or 04_memoryllm or 05_train or 08_mplus or 15_tiny or retention or test_cli"
