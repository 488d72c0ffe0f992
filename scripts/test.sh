#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU, then lint. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${SAEPIPE_PYTHON:-.venv/bin/python}
# The separate sae-lens environment tests/test_saelens_interop.py loads SAE dirs in (cached after one build).
SAEPIPE_SAELENS_PYTHON=$(bash scripts/saelens_venv.sh)
export SAEPIPE_SAELENS_PYTHON
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m pytest "$@"
