#!/usr/bin/env bash
# A throwaway PostgreSQL for the Prefect server of the multi-runner tests (and for trying the recipe in
# docs/orchestration.md). Idempotent: installs Debian's postgresql when missing, initialises a cluster in
# DIR (default: a new temporary directory), starts it on 127.0.0.1 on a free port, creates database `prefect`,
# and prints the connection URL (postgresql+asyncpg://...) as its last line of output.
# Stop it with:  pg_ctl -D DIR/data stop   (as the user that owns DIR/data; see below).
set -euo pipefail

DIR="${1:-$(mktemp -d -t dmd-postgres-XXXXXX)}"
mkdir -p "$DIR"

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
BINDIR="$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || command -v initdb)")"

# PostgreSQL refuses to run as root: run it as the `postgres` user the Debian package creates.
if [ "$(id -u)" = 0 ]; then
  chown postgres "$DIR"
  as_owner() { runuser -u postgres -- "$@"; }
else
  as_owner() { "$@"; }
fi

PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
if [ ! -f "$DIR/data/PG_VERSION" ]; then
  as_owner "$BINDIR/initdb" -D "$DIR/data" -U prefect --auth=trust -E UTF8 >"$DIR/initdb.log" 2>&1
fi
if as_owner "$BINDIR/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
  PORT="$(head -4 "$DIR/data/postmaster.pid" | tail -1)"
else
  # Prefect's server opens a pool per worker; keep connections and memory small for a test machine.
  as_owner "$BINDIR/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w -t 60 start \
    -o "-h 127.0.0.1 -p $PORT -k $DIR -c max_connections=200 -c shared_buffers=32MB -c fsync=off" >&2
fi
if ! as_owner "$BINDIR/psql" -h 127.0.0.1 -p "$PORT" -U prefect -d postgres -tAc \
  "SELECT 1 FROM pg_database WHERE datname = 'prefect'" | grep -q 1; then
  as_owner "$BINDIR/createdb" -h 127.0.0.1 -p "$PORT" -U prefect prefect
fi
echo "postgresql+asyncpg://prefect@127.0.0.1:$PORT/prefect"
