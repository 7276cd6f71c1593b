#!/usr/bin/env bash
# Creates .venv-compat (idempotent): the LOWEST supported stack, transformers 5.2.0, with
# NVIDIA's kvpress 0.5.5 (the reference library; it requires transformers < 5.3). CI runs
# the engine and CLI tests here as well as in .venv (the newest transformers), and the
# kvpress parity tests only here.
exec bash "$(dirname "$0")/setup_stack.sh" .venv-compat "transformers==5.2.0" "kvpress==0.5.5"
