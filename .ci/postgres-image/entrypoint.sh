#!/bin/sh
# The official postgres image's contract, for a PostgreSQL built from Debian's packages:
# POSTGRES_USER (default postgres), POSTGRES_PASSWORD (required unless
# POSTGRES_HOST_AUTH_METHOD=trust), POSTGRES_DB (default: the user), initdb on first start,
# listening on all addresses, password auth over TCP, trust on the local socket, and the files
# in /docker-entrypoint-initdb.d/ run once after initdb (*.sh executed when executable, sourced
# by bash otherwise; *.sql through psql), as the postgres user against a temporary server on the
# Unix socket only, as the official image does (the compose stack's app role script).
set -eu
PGBIN=/usr/lib/postgresql/15/bin
PGDATA=${PGDATA:-/var/lib/postgresql/data}
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
AUTH=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$AUTH" != trust ]; then
  echo "error: POSTGRES_PASSWORD is not set (or set POSTGRES_HOST_AUTH_METHOD=trust)" >&2
  exit 1
fi
mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:-}" > "$pwfile"
  chown postgres "$pwfile"
  as_postgres "$PGBIN/initdb" -D "$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
    --auth-local=trust --auth-host="$AUTH" --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  echo "host all all all $AUTH" >> "$PGDATA/pg_hba.conf"
  initdir=/docker-entrypoint-initdb.d
  as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  if [ "$POSTGRES_DB" != postgres ]; then
    as_postgres "$PGBIN/psql" -v ON_ERROR_STOP=1 -q --username="$POSTGRES_USER" --dbname=postgres \
      -c "CREATE DATABASE \"$POSTGRES_DB\""
  fi
  if [ -d "$initdir" ]; then
    for f in $(find "$initdir" -maxdepth 1 -type f \( -name '*.sh' -o -name '*.sql' \) | sort); do
      echo "running $f"
      case "$f" in
        *.sql) as_postgres "$PGBIN/psql" -v ON_ERROR_STOP=1 -q --username="$POSTGRES_USER" \
                 --dbname="$POSTGRES_DB" -f "$f" ;;
        *) if [ -x "$f" ]; then as_postgres "$f"; else as_postgres bash -c '. "$0"' "$f"; fi ;;
      esac
    done
  fi
  as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
  echo "PostgreSQL init process complete; ready for start up."
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups \
  "$PGBIN/postgres" -D "$PGDATA" -c listen_addresses='*' "$@"
