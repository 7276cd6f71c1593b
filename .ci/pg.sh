#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback, for the test suite only.
#
#   export KNORMCTL_TEST_PG_URL="$(.ci/pg.sh start)"   # prints the URL on stdout, logs on stderr
#   python -m pytest ...
#   .ci/pg.sh stop
#
# start: installs PostgreSQL from Debian's packages when no server binaries are
#        found, creates a cluster in a temporary folder (trust auth, listening on
#        127.0.0.1 only, no fsync: nothing here must survive), starts it on the
#        first free port from $KNORMCTL_PG_PORT (default 54329). Running it again
#        while the server is up just prints the URL again.
# stop:  stops the server and removes the folder. Nothing to do is not an error.
# url:   prints the URL of the running server (exit 1 when none).
set -euo pipefail

BASE="${KNORMCTL_PG_DIR:-${TMPDIR:-/tmp}/knormctl-ci-pg}"
FIRST_PORT="${KNORMCTL_PG_PORT:-54329}"

log() { echo "pg.sh: $*" >&2; }

pg_bin() {  # the newest installed server's bin folder
  local ctl
  ctl="$(ls /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -n 1 || true)"
  [ -n "$ctl" ] && dirname "$ctl"
}

as_owner() {  # initdb and postgres refuse to run as root: use the postgres account then
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

url_for() { echo "postgresql+psycopg://postgres@127.0.0.1:$1/postgres"; }

running() {  # is our server up (and answering)?
  local bin="$1"
  [ -f "$BASE/port" ] && [ -d "$BASE/data" ] || return 1
  as_owner "$bin/pg_ctl" -D "$BASE/data" status >/dev/null 2>&1 || return 1
  "$bin/pg_isready" -q -h 127.0.0.1 -p "$(cat "$BASE/port")"
}

port_free() {  # nothing answers on 127.0.0.1:$1
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
  local bin port
  bin="$(pg_bin || true)"
  if [ -z "$bin" ]; then
    log "installing PostgreSQL from Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    bin="$(pg_bin)" || { log "no pg_ctl after installing postgresql"; exit 1; }
  fi

  if running "$bin"; then
    url_for "$(cat "$BASE/port")"
    return 0
  fi
  [ -e "$BASE" ] && stop_server "$bin" && rm -rf "$BASE"  # a half-made or dead cluster: start over

  port="$FIRST_PORT"
  while ! port_free "$port"; do
    port=$((port + 1))
    [ "$port" -lt $((FIRST_PORT + 100)) ] || { log "no free port from $FIRST_PORT"; exit 1; }
  done

  mkdir -p "$BASE"
  [ "$(id -u)" = 0 ] && chown postgres: "$BASE"
  log "initdb in $BASE/data"
  as_owner "$bin/initdb" -D "$BASE/data" -U postgres -A trust -E UTF8 --no-locale --no-sync >"$BASE/initdb.log" 2>&1 \
    || { cat "$BASE/initdb.log" >&2; exit 1; }
  log "starting on 127.0.0.1:$port"
  # -k: the Unix socket goes to our folder (the default /var/run/postgresql may not exist);
  # fsync off etc.: a test server whose data is thrown away, so commits need not hit the disk.
  as_owner "$bin/pg_ctl" -D "$BASE/data" -l "$BASE/server.log" -w -t 60 \
    -o "-k $BASE -h 127.0.0.1 -p $port -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
    start >&2 || { cat "$BASE/server.log" >&2; exit 1; }
  echo "$port" >"$BASE/port"
  url_for "$port"
}

stop_server() {
  local bin="$1"
  if [ -d "$BASE/data" ] && [ -n "$bin" ]; then
    as_owner "$bin/pg_ctl" -D "$BASE/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

stop() {
  local bin
  bin="$(pg_bin || true)"
  [ -e "$BASE" ] || return 0
  stop_server "$bin"
  rm -rf "$BASE"
  log "stopped and removed $BASE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  url) bin="$(pg_bin || true)"; [ -n "$bin" ] && running "$bin" && url_for "$(cat "$BASE/port")" ;;
  *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac
