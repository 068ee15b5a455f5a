#!/usr/bin/env bash
# Run the quick tracking suite and compare it with bench/baseline.json; options in bench/track.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" bench/track.py "$@"
