#!/usr/bin/env bash
# One command for a fresh machine: set up, fetch the offline model and text (first run
# only), run the default sweep (smollm2-135m on wiki-lite), then show its report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
knormctl sweep "$@"
knormctl report --last
