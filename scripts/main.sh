#!/usr/bin/env bash
# Set up a fresh machine and run the main job (retention on the embedded tiny model); results land in runs/retention/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
memnb run "${MEMNB_MAIN:-retention}" "$@"   # results: runs/${MEMNB_MAIN:-retention}/ (retention.json, retention.png, notebook + HTML)
