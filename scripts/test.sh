#!/usr/bin/env bash
# The test suite, exactly as CI runs it: set up, start a throwaway PostgreSQL on loopback
# (the store tests run on SQLite and PostgreSQL), run pytest, stop the server.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
if url=$(bash .ci/pg.sh start); then
  export KNORMCTL_TEST_PG_URL="$url"
else
  echo "warning: PostgreSQL could not be started; PostgreSQL store tests will be skipped" >&2
fi
python -m pytest "$@"
rc=$?
bash .ci/pg.sh stop >/dev/null 2>&1 || true
# pytest exit code 5 means "no tests ran": that is a failure, not a green run.
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
