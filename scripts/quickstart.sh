#!/usr/bin/env bash
# Sets up a virtual environment with calm_jax, then runs the quickstart: prepare the embedded
# corpus, train the autoencoder, CALM and the baseline, evaluate them and print continuations.
# Usage: bash scripts/quickstart.sh [--root=runs/quickstart]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CALM_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
exec "$VENV/bin/python" -m launch.quickstart "$@"
