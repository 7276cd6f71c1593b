#!/usr/bin/env bash
# Creates .venv (idempotent) with torch 2.13.0 (the CPU build pip finds on this machine's
# disk; elsewhere pip fetches it from PyPI) and knormctl with its dev and postgres extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.knormctl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setting up .venv: torch 2.13.0 (CPU) and knormctl's dependencies (1-3 minutes)" >&2
  python -m pip install -q --upgrade pip
  # torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[dev,postgres]"
  touch "$stamp"
fi
