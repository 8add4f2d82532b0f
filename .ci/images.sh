#!/usr/bin/env bash
# Build the project's images with its own Dockerfiles, unmodified, as docker compose would:
# chatkit-pg:local (Dockerfile) and chatkit-pg-web:local (frontend/Dockerfile, the nginx
# service), on the stand-in bases of .ci/standins/build.sh. Prints each image's size and build
# time. BuildKit's cache keys every step on its inputs, so a second run takes seconds.
#
# The Dockerfiles use RUN --mount=type=cache, which needs BuildKit. The client: `docker buildx`
# when installed; else Debian's docker.io CLI (20.10), whose `docker build` has BuildKit built
# in (a newer CLI without the buildx plugin refuses DOCKER_BUILDKIT=1). The engine's BuildKit
# uses the stand-ins from its own image store; nothing is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/standins/build.sh
if docker buildx version >/dev/null 2>&1; then
  build=(docker buildx build --load)
elif [ -x /usr/bin/docker ] && /usr/bin/docker --version | grep -q 'version 20\.'; then
  build=(env DOCKER_BUILDKIT=1 /usr/bin/docker build)
else
  echo "no BuildKit client: install docker-buildx, or Debian's docker.io" >&2
  exit 1
fi
backend=${CHATKIT_IMAGE:-chatkit-pg:local}
web=${CHATKIT_WEB_IMAGE:-chatkit-pg-web:local}
log=${CHATKIT_CI_CACHE:-/var/cache/chatkit-pg-ci}/images.log
mkdir -p "$(dirname "$log")"
one() {
  local tag=$1 start old
  shift
  start=$SECONDS
  old=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
  if ! "${build[@]}" --progress=plain -t "$tag" "$@" >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "building $tag failed (whole log: $log)" >&2
    exit 1
  fi
  printf '%-32s %6s MB %4ss\n' "$tag" "$(($(docker image inspect -f '{{.Size}}' "$tag") / 1000000))" \
    "$((SECONDS - start))"
  # The image this build replaced (vfs keeps every layer whole): gone unless a container uses it.
  if [ -n "$old" ] && [ "$old" != "$(docker image inspect -f '{{.Id}}' "$tag")" ]; then
    docker rmi "$old" >/dev/null 2>&1 || true
  fi
}
one "$backend" -f Dockerfile .
# docker-compose.yml's build argument, with its default.
one "$web" --build-arg "VITE_CHATKIT_DOMAIN_KEY=${CHATKIT_DOMAIN_KEY:-domain_pk_localhost_dev}" frontend
