#!/usr/bin/env bash
# Set up a fresh machine and run memnb's main job; results land in runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
memnb run "${MEMNB_MAIN:-ops_bench}" "$@"
