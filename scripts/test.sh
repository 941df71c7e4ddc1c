#!/usr/bin/env bash
# Install into a fresh virtual environment and run the test suite (the README's test command; CI runs this).
# torch is pinned (extra "export") so pip takes the local CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[export,dev,serve,video]'
exec "$VENV/bin/python" -m pytest -q "$@"
