#!/usr/bin/env bash
# Install (first time) and run the whole openk2 pipeline on the embedded defaults.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/install.sh
.venv/bin/openk2 params --preset tiny
exec .venv/bin/openk2 init --preset tiny --out runs/init "$@"
