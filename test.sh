#!/usr/bin/env bash
# Install (first time) and run the test suite. Extra arguments go to pytest,
# e.g. ./test.sh -m slow, ./test.sh tests/test_model.py -x.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/install.sh
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest "$@"
