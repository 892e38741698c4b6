#!/usr/bin/env bash
# Creates (or updates) the virtual environment .venv with keras_midl and
# everything its tests, examples and benchmarks need, at the pinned versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check \
  -c requirements/constraints.txt -e ".[all]" -r requirements/benchmarks.txt
