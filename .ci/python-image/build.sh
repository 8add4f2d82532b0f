#!/usr/bin/env bash
# Build a Debian image with nothing but the Python of one release, plus what the README asks a
# newcomer for (python3-venv, make, git), from Debian's packages only (nothing can be pulled
# here): `trixie` has Python 3.13, `sid` 3.14. One test tool more: psql (postgresql-client), which
# tests/pg/test_app_role.py runs the deployment's role script with (the bundled one crashes).
# Prints the image tag. Idempotent: an image already built from this file is kept.
set -euo pipefail
release=${1:?usage: build.sh trixie|sid}
tag="chatkit-pg-test/python:$release"
digest=$(sha256sum "$0" | cut -c1-12)
if [ "$(docker image inspect -f '{{index .Config.Labels "files"}}' "$tag" 2>/dev/null)" = "$digest" ]; then
  echo "$tag"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# sid's Release file may be past its Valid-Until date on a mirror: not a reason to fail.
mmdebstrap --quiet --variant=minbase --aptopt='Acquire::Check-Valid-Until "false"' \
  --include=python3,python3-venv,make,git,ca-certificates,postgresql-client \
  "$release" "$work/rootfs.tar" "deb http://deb.debian.org/debian $release main" >&2
docker import --change "LABEL files=$digest" "$work/rootfs.tar" "$tag" >&2
echo "$tag"
