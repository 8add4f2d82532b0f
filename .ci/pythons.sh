#!/usr/bin/env bash
# The project on every current Python, as a newcomer meets it: for Debian trixie (Python 3.13)
# and sid (3.14), an image with only that Python (python-image/build.sh), in which a fresh clone
# of this checkout runs `make install`, `make run` (smoke) and `make test`
# (python-image/inside.sh). The machine's own Python (3.11) is .ci/run's other passes.
# Usage: .ci/pythons.sh [release...]  (default: trixie sid)
set -euo pipefail
cd "$(dirname "$0")/.."
releases=("$@")
[ "${#releases[@]}" -gt 0 ] || releases=(trixie sid)
# The machine's trust store goes in with the clone: where package downloads pass a proxy with
# its own certificate authority, the container must trust what the machine trusts.
tls=()
bundle=/etc/ssl/certs/ca-certificates.crt
if [ -f "$bundle" ]; then
  tls=(-v "$bundle:$bundle:ro" -e "SSL_CERT_FILE=$bundle" -e "PIP_CERT=$bundle")
fi
cache=${CHATKIT_CI_CACHE:-/var/cache/chatkit-pg-ci}/uv
mkdir -p "$cache"
# The releases run side by side (their suites mostly wait on servers and clients, so two fit
# on two cores), each into its own log, printed whole once both are done. Each container has a
# network of its own (the default bridge): its loopback ports are its own, whatever runs beside.
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
pids=()
for release in "${releases[@]}"; do
  image=$(.ci/python-image/build.sh "$release")
  (
    echo "=== $release: $(docker run --rm "$image" python3 -V)"
    docker run --rm --shm-size=1g "${tls[@]}" -e UV_LINK_MODE=copy \
      -v "$PWD:/src:ro" -v "$cache:/root/.cache/uv" \
      "$image" bash /src/.ci/python-image/inside.sh
  ) >"$logs/$release.log" 2>&1 &
  pids+=($!)
done
failed=()
for i in "${!releases[@]}"; do
  wait "${pids[$i]}" || failed+=("${releases[$i]}")
done
for release in "${releases[@]}"; do
  cat "$logs/$release.log"
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed on: ${failed[*]}" >&2
  exit 1
fi
