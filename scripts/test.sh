#!/usr/bin/env bash
# Sets up a virtual environment with calm_jax and its test dependencies, then runs the suite.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CALM_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test]'
# Serial by default: the training tests prepare the shared tiny data directory on first use,
# and two xdist workers doing so at once can race (set PYTEST_WORKERS=2 once that is locked).
exec "$VENV/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-0}" "$@"
