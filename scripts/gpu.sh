#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and the CUDA build of torch: build the CUDA kernels, run the `cuda`-flagged tests
# and the GPU benchmarks. Usage: scripts/gpu.sh [OUT_DIR]  (default runs/gpu; PYTHON picks the interpreter).
set -uo pipefail
OUT_DIR=$(realpath -m "${1:-runs/gpu}"); mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
memnb() { "$PY" -c 'import sys; from memnb.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
"$PY" -c "import torch; assert torch.cuda.is_available(), 'scripts/gpu.sh: torch sees no GPU'; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" || exit 1
time "$PY" -c "from memnb.ops import backend; b = {n: backend(n, 'cuda') for n in ('embedding_bag_wsum', 'topk_mean_sigmoid', 'pool_drop_append')}; print(b); assert set(b.values()) == {'cuda'}, b" || exit 1
rc=0
"$PY" -m pytest -q -p no:cacheprovider -m cuda -n 4 tests 2>&1 | tee "$OUT_DIR/cuda_tests.log" || rc=1
memnb run ops_cuda_bench --no-html -o "$OUT_DIR/ops_cuda_bench" ${OPS_CUDA_PARAMS:-} || rc=1
exit $rc
