#!/usr/bin/env bash
# Stand-ins for the base images the project's Dockerfiles and docker-compose.yml name, on a
# machine that cannot pull from a registry: each is made from Debian's packages (mmdebstrap +
# `docker import`) or from PyPI (uv's wheel), and tagged with exactly the published name, so the
# unmodified Dockerfiles build and the unmodified compose file runs. docs/deployment.md lists
# every difference between a stand-in and the published image that matters.
#
#   python:3.12.12-slim-trixie    trixie minbase + python3 (3.13), python -> python3 in /usr/local/bin
#   ghcr.io/astral-sh/uv:0.13.9   only /uv and /uvx, from the same version's PyPI wheel
#   node:22-bookworm-slim         trixie minbase + nodejs (20.19) + npm: bookworm's Node is too old for Vite
#   nginx:1.28-alpine             trixie's nginx (1.26) with the official image's template entrypoint
#   postgres:16-bookworm          .ci/postgres-image (bookworm's PostgreSQL 15) under the compose name
#
# The stand-ins that download during a build (python: uv sync; node: npm ci) carry this
# machine's CA bundle: package downloads here pass a proxy with its own certificate authority.
# Idempotent: an image whose label `files` matches the key of its inputs (key_of) is kept. Prints one
# line per image: name, size, seconds spent building it (0 when kept).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ci="$(dirname "$here")"
bundle=/etc/ssl/certs/ca-certificates.crt
# Names and versions: the Dockerfiles' ARG defaults and docker-compose.yml's images.
PYTHON_TAG=python:3.12.12-slim-trixie
UV_VERSION=0.13.9
UV_TAG=ghcr.io/astral-sh/uv:$UV_VERSION
NODE_TAG=node:22-bookworm-slim
NGINX_TAG=nginx:1.28-alpine
POSTGRES_TAG=postgres:16-bookworm

# A stand-in's cache key: the code that makes it (its function and the rootfs helper, so an edit
# elsewhere in this file rebuilds nothing) and the files it takes in.
key_of() {
  local fn=$1
  shift
  { declare -f rootfs "$fn"; cat "$@"; } | sha256sum | cut -c1-12
}
current() {
  [ "$(docker image inspect -f '{{index .Config.Labels "files"}}' "$1" 2>/dev/null)" = "$2" ] && return
  # Out of date: the image it replaces is removed once the new one has its name.
  replaced+=("$(docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true)")
  return 1
}
replaced=()
report() {
  local size
  size=$(docker image inspect -f '{{.Size}}' "$1")
  printf '%-32s %6s MB %4ss\n' "$1" "$((size / 1000000))" "$2"
}

# A Debian root filesystem as a tar: release, packages, extra mmdebstrap options.
rootfs() {
  local release=$1 packages=$2 out=$3
  shift 3
  mmdebstrap --quiet --variant=minbase --aptopt='Acquire::Check-Valid-Until "false"' \
    --include="$packages" --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    "$@" "$release" "$out" "deb http://deb.debian.org/debian $release main" >&2
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python_standin() {
  local key start
  key=$(key_of python_standin "$bundle")
  if current "$PYTHON_TAG" "$key"; then report "$PYTHON_TAG" 0; return; fi
  start=$SECONDS
  rootfs trixie python3,ca-certificates "$work/python.tar" \
    --customize-hook='ln -s /usr/bin/python3 "$1"/usr/local/bin/python' \
    --customize-hook='ln -s /usr/bin/python3 "$1"/usr/local/bin/python3' \
    --customize-hook="cp $bundle \"\$1\"$bundle"
  docker import --change "LABEL files=$key" \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change "ENV SSL_CERT_FILE=$bundle" \
    --change 'CMD ["python3"]' "$work/python.tar" "$PYTHON_TAG" >/dev/null
  report "$PYTHON_TAG" $((SECONDS - start))
}

uv_standin() {
  local key start
  key=$(echo "$UV_VERSION" | key_of uv_standin -)
  if current "$UV_TAG" "$key"; then report "$UV_TAG" 0; return; fi
  start=$SECONDS
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_17_x86_64 --python-version 3.12 -d "$work/uv" "uv==$UV_VERSION" >&2
  mkdir -p "$work/uv/root"
  (cd "$work/uv" && python3 -m zipfile -e uv-*.whl unpacked)
  install -m 755 "$work"/uv/unpacked/uv-*.data/scripts/uv "$work"/uv/unpacked/uv-*.data/scripts/uvx "$work/uv/root/"
  tar -C "$work/uv/root" -cf "$work/uv.tar" uv uvx
  docker import --change "LABEL files=$key" --change 'ENTRYPOINT ["/uv"]' \
    "$work/uv.tar" "$UV_TAG" >/dev/null
  report "$UV_TAG" $((SECONDS - start))
}

node_standin() {
  local key start
  key=$(key_of node_standin "$bundle")
  if current "$NODE_TAG" "$key"; then report "$NODE_TAG" 0; return; fi
  start=$SECONDS
  rootfs trixie nodejs,npm,ca-certificates "$work/node.tar" \
    --customize-hook="cp $bundle \"\$1\"$bundle"
  docker import --change "LABEL files=$key" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "ENV NODE_EXTRA_CA_CERTS=$bundle" \
    --change 'CMD ["node"]' "$work/node.tar" "$NODE_TAG" >/dev/null
  report "$NODE_TAG" $((SECONDS - start))
}

nginx_standin() {
  local key start
  key=$(key_of nginx_standin "$here/nginx-entrypoint.sh")
  if current "$NGINX_TAG" "$key"; then report "$NGINX_TAG" 0; return; fi
  start=$SECONDS
  # Like the official image: nginx.conf includes only conf.d/*.conf (no sites-enabled), logs
  # go to the container's stdout/stderr, the default server answers in conf.d/default.conf
  # (the template replaces it), workers run as an unprivileged user.
  rootfs trixie nginx,gettext-base "$work/nginx.tar" \
    --customize-hook='rm -f "$1"/etc/nginx/sites-enabled/* && sed -i "/sites-enabled/d" "$1"/etc/nginx/nginx.conf' \
    --customize-hook='mkdir -p "$1"/etc/nginx/conf.d "$1"/etc/nginx/templates "$1"/usr/share/nginx/html "$1"/docker-entrypoint.d' \
    --customize-hook='printf "server {\n    listen 80;\n    location / { root /usr/share/nginx/html; index index.html; }\n}\n" > "$1"/etc/nginx/conf.d/default.conf' \
    --customize-hook='ln -sf /dev/stdout "$1"/var/log/nginx/access.log && ln -sf /dev/stderr "$1"/var/log/nginx/error.log' \
    --customize-hook="upload $here/nginx-entrypoint.sh /docker-entrypoint.sh" \
    --customize-hook='chmod 755 "$1"/docker-entrypoint.sh'
  docker import "$work/nginx.tar" chatkit-pg-ci/nginx-rootfs:trixie >/dev/null
  # STOPSIGNAL (graceful stop, as the official image) is not a `docker import --change`.
  printf '%s\n' 'FROM chatkit-pg-ci/nginx-rootfs:trixie' "LABEL files=$key" \
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'ENTRYPOINT ["/docker-entrypoint.sh"]' 'STOPSIGNAL SIGQUIT' 'EXPOSE 80' \
    'CMD ["nginx", "-g", "daemon off;"]' | DOCKER_BUILDKIT=0 docker build -q -t "$NGINX_TAG" - >/dev/null
  report "$NGINX_TAG" $((SECONDS - start))
}

postgres_standin() {
  local start image
  start=$SECONDS
  image=$("$ci/postgres-image/build.sh")
  docker tag "$image" "$POSTGRES_TAG"
  report "$POSTGRES_TAG" $((SECONDS - start))
}

python_standin
uv_standin
node_standin
nginx_standin
postgres_standin
for id in "${replaced[@]}"; do
  [ -n "$id" ] && docker rmi "$id" >/dev/null 2>&1 || true
done
