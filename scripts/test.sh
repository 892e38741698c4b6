#!/usr/bin/env bash
# Installs everything into .venv, then runs ruff and the whole test suite
# once per backend (TensorFlow, JAX, PyTorch). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TF_CPP_MIN_LOG_LEVEL=3
.venv/bin/ruff check .
status=0
for backend in tensorflow jax torch; do
  echo "=== pytest, KERAS_BACKEND=$backend"
  # Two workers (pytest-xdist), one per core.
  KERAS_BACKEND=$backend .venv/bin/python -m pytest -n 2 "$@" || status=1
done
exit $status
