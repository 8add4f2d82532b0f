#!/usr/bin/env bash
# Make sure a Docker engine answers (CI's testcontainers pass): start dockerd with the vfs
# storage driver when none runs. Exits non-zero if the engine does not come up in 60 s.
set -euo pipefail
if docker info >/dev/null 2>&1; then
  exit 0
fi
log=/tmp/chatkit-pg-dockerd.log
nohup dockerd --storage-driver=vfs >"$log" 2>&1 &
for _ in $(seq 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not start; see $log" >&2
tail -20 "$log" >&2
exit 1
