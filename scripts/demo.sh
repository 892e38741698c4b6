#!/usr/bin/env bash
# Installs everything into .venv, then trains a Dense MLP and the same MLP
# with MIDL hidden layers and prints the comparison. Arguments go to
# examples/quickstart.py (e.g. --backend jax --k-ratio 0.45 --epochs 20).
# It writes quickstart.md outside the repository unless given
# --output benchmarks/results/quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m examples.quickstart "$@"
