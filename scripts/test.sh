#!/usr/bin/env bash
# The test suite, exactly as CI runs it:
#  1. set up .venv (the newest tested transformers, 5.24.0) and start a throwaway PostgreSQL on loopback
#     (the store tests run on SQLite and PostgreSQL), run the whole suite;
#  2. set up .venv-compat (the lowest supported transformers, 5.2.0, with kvpress 0.5.5) and
#     run the engine and CLI tests again there, plus the kvpress parity tests;
#  3. set up .venv-mid (transformers 5.17.0, what a typical CUDA image holds: where --decode-step
#     graph first runs) and run the engine tests there.
# Arguments go to the first pytest run only (e.g. -x, -k). Exit code: non-zero if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
# The PostgreSQL store tests must run: without a server they fail instead of skipping
# (tests/db_fixtures.py), and a server that cannot start fails the run by itself.
export KNORMCTL_REQUIRE_PG=1
pg_rc=0
if url=$(bash .ci/pg.sh start); then
  export KNORMCTL_TEST_PG_URL="$url"
else
  echo "error: PostgreSQL could not be started: the PostgreSQL store tests cannot run (see pg.sh's messages above)" >&2
  pg_rc=1
fi
# The HTML report is checked in a real headless browser: without one that test fails, not skips.
export KNORMCTL_REQUIRE_BROWSER=1
bash .ci/chromium.sh >/dev/null || echo "error: no headless browser: the HTML report test will fail" >&2
python -m pytest -m "not kvpress" "$@"
rc=$?
bash .ci/pg.sh stop >/dev/null 2>&1 || true
deactivate
# pytest exit code 5 means "no tests ran": that is a failure, not a green run.
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  rc=1
fi
[ "$rc" -eq 0 ] && rc=$pg_rc

ENGINE_TESTS=(tests/test_engine.py tests/test_batch.py tests/test_graphstep.py tests/test_families.py
              tests/test_presses.py tests/test_protocols.py tests/test_cuda.py tests/test_kvbuffer.py
              tests/test_prefill_chunk.py tests/test_device_map.py tests/test_capacity.py)
COMPAT_TESTS=("${ENGINE_TESTS[@]}" tests/test_cli_run.py tests/test_passkey.py tests/test_kvpress_parity.py
              tests/test_repeats.py)
# stage NAME VERSION MARKERS TESTS...: set up .venv-NAME and run TESTS there, asserting VERSION.
stage() {
  local name=$1 version=$2 markers=$3; shift 3
  local setup=(bash scripts/setup_stack.sh ".venv-$name" "transformers==$version")
  [ "$name" = compat ] && setup=(bash scripts/setup_compat.sh)
  if ! "${setup[@]}"; then
    echo "error: could not set up .venv-$name (transformers $version)" >&2
    return 1
  fi
  KNORMCTL_EXPECT_TRANSFORMERS=$version ".venv-$name/bin/python" -m pytest -q -m "$markers" "$@"
  local src=$?
  [ "$src" -eq 5 ] && { echo "error: the transformers $version run collected no tests" >&2; src=1; }
  return "$src"
}
# The lowest supported stack: the same engine and CLI tests, and parity with kvpress.
# KNORMCTL_EXPECT_TRANSFORMERS makes a test fail if the venv holds another version (so this
# run cannot pass on the wrong stack), and checks which name each version reads the cache under.
stage compat 5.2.0 "not slow and not postgres" "${COMPAT_TESTS[@]}"
crc=$?

# The CUDA image's stack (transformers 5.17.0): the engine tests, which hold the static decode
# step that --decode-step graph records.
stage mid 5.17.0 "not slow and not postgres and not kvpress" "${ENGINE_TESTS[@]}"
mrc=$?
[ "$rc" -ne 0 ] && exit "$rc"
[ "$crc" -ne 0 ] && exit "$crc"
exit "$mrc"
