#!/usr/bin/env bash
# Creates .venv-compat (idempotent): the LOWEST supported stack, transformers 5.2.0, with
# NVIDIA's kvpress 0.5.5 (the reference library; it requires transformers < 5.3). CI runs
# the engine and CLI tests here as well as in .venv (the newest transformers), and the
# kvpress parity tests only here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-compat/bin/python ]; then
  "$PY" -m venv .venv-compat
fi
stamp=.venv-compat/.knormctl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
  .venv-compat/bin/python -m pip install -q --upgrade pip
  .venv-compat/bin/python -m pip install -q "torch==2.13.0"
  .venv-compat/bin/python -m pip install -q "transformers==5.2.0" "kvpress==0.5.5" -e ".[dev]"
  touch "$stamp"
fi
