#!/usr/bin/env bash
# Build a local PostgreSQL 15 image honouring the official image's contract, from Debian's
# packages only (no registry): CI's testcontainers pass runs on it. Prints the image tag.
# Idempotent: an image already built from these files is kept.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tag="chatkit-pg-test/postgres:15"
base="chatkit-pg-test/debian-postgresql:15"
digest=$(cat "$here/Dockerfile" "$here/entrypoint.sh" | sha256sum | cut -c1-12)

if [ "$(docker image inspect -f '{{index .Config.Labels "files"}}' "$tag" 2>/dev/null)" = "$digest" ]; then
  echo "$tag"
  exit 0
fi
if ! docker image inspect "$base" >/dev/null 2>&1; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mmdebstrap --quiet --variant=minbase --include=postgresql-15 \
    --customize-hook='rm -rf "$1"/var/lib/postgresql/15 "$1"/etc/postgresql/15' \
    bookworm "$work/rootfs.tar" /etc/apt/sources.list.d/debian.sources >&2
  docker import "$work/rootfs.tar" "$base" >&2
fi
docker build --quiet --label "files=$digest" --build-arg "BASE=$base" -t "$tag" "$here" >&2
echo "$tag"
