#!/usr/bin/env bash
# Install (first time) and run the whole openk2 pipeline on the embedded defaults.
# Extra arguments go to `openk2 speedrun` (e.g. --out runs/mine, --set train.steps=100).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/install.sh
exec .venv/bin/openk2 speedrun "$@"
