#!/usr/bin/env bash
# Print the python of a separate virtualenv holding sae-lens, building it once. The SAELens interop test
# (tests/test_saelens_interop.py) loads saepipe's SAE dirs there: sae-lens pins transformer-lens < 4 and
# saepipe needs >= 4, so the two cannot share one environment.
#
# The venv is cached under $SAEPIPE_HOME/venvs (default ~/.cache/saepipe/venvs), keyed by the sae-lens
# version and the constraints file, so only the first run (or a changed pin) pays for the install.
# SAEPIPE_SAELENS_PYTHON, when set, names an existing sae-lens python instead and nothing is built.
set -euo pipefail
cd "$(dirname "$0")/.."
SAELENS_VERSION=6.54.12
if [ -n "${SAEPIPE_SAELENS_PYTHON:-}" ]; then
  echo "$SAEPIPE_SAELENS_PYTHON"
  exit 0
fi
key=$(cat scripts/saelens-constraints.txt | sha256sum | cut -c1-12)
VENV="${SAEPIPE_HOME:-$HOME/.cache/saepipe}/venvs/sae-lens-$SAELENS_VERSION-$key"
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # two CI runs on one machine build it once
if [ ! -f "$VENV/.complete" ]; then
  echo "saelens_venv: building $VENV (once; a few minutes)" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >&2; }
  pip install torch==2.13.0  # pinned first: an unpinned torch would pull a multi-GB CUDA build
  pip install "sae-lens==$SAELENS_VERSION" -c scripts/saelens-constraints.txt
  touch "$VENV/.complete"  # written last: a killed build is redone, never half used
fi
echo "$VENV/bin/python"
