#!/usr/bin/env bash
# Creates (idempotently) a virtual environment for one more transformers stack the engine is
# tested on: CPU torch 2.13, the given packages, and knormctl itself (editable, with [dev]).
#   bash scripts/setup_stack.sh .venv-compat "transformers==5.2.0" "kvpress==0.5.5"
#   bash scripts/setup_stack.sh .venv-mid "transformers==5.17.0"
# Reinstalled when pyproject.toml, this script or the package list changes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$1; shift
PY=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
stamp=$venv/.knormctl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ] || [ "$(cat "$stamp")" != "$*" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  "$venv/bin/python" -m pip install -q "$@" -e ".[dev]"
  echo "$*" > "$stamp"
fi
