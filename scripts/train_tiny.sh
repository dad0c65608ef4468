#!/usr/bin/env bash
# Retrain the embedded tiny model the way the shipped weights were made, on 2 CPU cores in about 90 minutes:
# 58 min from scratch, then 31 min more of the memory stage from those weights. Usage: bash scripts/train_tiny.sh [OUT]
# The weights land in OUT/final (default runs/tiny_retrain/final); copy its files to memnb/assets/tiny/ to ship them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
out="$(realpath -m "${1:-runs/tiny_retrain}")"
memnb run train_tiny -o "$out/base" --no-html -p minutes 58 -p ema 0.999
memnb run train_tiny -o "$out/final" --no-html -p init "$out/base" -p steps 8000 -p minutes 31 -p lr 0.001 -p phase1 0.1 -p ramp 0.05 \
  -p unknown_weight 2 -p pool_distractor_frac 0.5 -p ema 0.999
echo "weights: $out/final (the shipped ones: memnb/assets/tiny/manifest.json)"
