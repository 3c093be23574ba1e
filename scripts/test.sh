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
# Two workers by default (PYTEST_WORKERS=0: serial), each test file whole on one worker so that
# module fixtures are built once.  Most of a test's time is single-threaded Python tracing and
# XLA:CPU compilation, so two workers use both cores of a small machine: on a 2-core VM the
# suite took 631 s with two workers (2026-11-29).  All processes share one persistent XLA
# compilation cache (see tests/conftest.py).
# The glibc malloc settings of the entry points (calm_jax/hostmem.py), for every test process.
eval "$("$VENV/bin/python" -m calm_jax.hostmem)"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d -t calm_jax_xla_cache_XXXXXX)}"
exec "$VENV/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
