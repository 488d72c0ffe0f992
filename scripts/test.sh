#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU, then lint. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${SAEPIPE_PYTHON:-.venv/bin/python}
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m pytest "$@"
