#!/usr/bin/env bash
# Builds and installs Citus (test infrastructure for tests/citus/) into the machine's
# PostgreSQL 15 when it is missing. Citus is not packaged for this Debian and cannot be
# downloaded here: its source release sits next to the repository in ../shared/vendor/citus.
# Nothing of Citus is committed into the project. Idempotent: does nothing when installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN=${CITUS_PG_BIN:-/usr/lib/postgresql/15/bin}
PG_LIB=$("$PG_BIN/pg_config" --pkglibdir 2>/dev/null || echo /usr/lib/postgresql/15/lib)
if [ -f "$PG_LIB/citus.so" ]; then
  echo "citus: already installed in $PG_LIB"
  exit 0
fi

VENDOR=$(cd .. && pwd)/shared/vendor/citus
VERSION=13.2.2
BUILD=${CITUS_BUILD_DIR:-$(mktemp -d /tmp/citus-build.XXXXXX)}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
pkgs=(postgresql-server-dev-15 libkrb5-dev liblz4-dev libzstd-dev)
if ! dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${pkgs[@]}"
fi

mkdir -p "$BUILD"
tar xzf "$VENDOR/citus-$VERSION.tar.gz" -C "$BUILD"
cd "$BUILD/citus-$VERSION"
patch -p1 --forward < "$VENDOR/pg15-have-createdb-privilege.patch"
PG_CONFIG="$PG_BIN/pg_config" ./configure --without-libcurl
make -j"$(nproc)"
$SUDO make install
echo "citus: installed into $PG_LIB"
