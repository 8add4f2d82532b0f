# chatkit-pg: the FastAPI backend as a small, non-root image.
#
#   docker build -t chatkit-pg .
#
# Stage 1 resolves the locked dependencies with uv into /app/.venv (dependencies first, so a
# code change reuses the dependency layer); stage 2 is a clean slim Python with only that
# virtual environment and the code: no uv, no compilers, no build cache. Every dependency
# ships a manylinux wheel, so neither stage needs a C toolchain.

ARG PYTHON_VERSION=3.12.12
ARG DEBIAN_RELEASE=trixie
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS builder

COPY --from=uv /uv /usr/local/bin/uv

# Bytecode compiled at build time (faster cold start); copies instead of hard links (the
# cache is a separate mount); the image's own interpreter, never a downloaded one: `python3`
# on PATH, which every Python base has (/usr/local/bin on the official image, /usr/bin on a
# distribution's). No `# syntax=` line: BuildKit's built-in frontend reads this file, and
# fetching another from a registry fails where registries are unreachable.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=python3 \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /app

# Layer 1: third-party dependencies only, from the lock file (changes rarely).
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-default-groups --no-install-project

# Layer 2: the project itself (changes often). The app finds alembic.ini and migrations/
# next to its package, so the code stays in /app and is installed in place; its bytecode is
# compiled here because the runtime filesystem is read-only.
COPY README.md alembic.ini ./
COPY migrations ./migrations
COPY app ./app
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-default-groups \
 && /app/.venv/bin/python -m compileall -q app migrations

# ---------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime

LABEL org.opencontainers.image.title="chatkit-pg" \
      org.opencontainers.image.description="OpenAI ChatKit backend on PostgreSQL" \
      org.opencontainers.image.licenses="MIT"

# A fixed, unprivileged uid/gid so volume permissions and PodSecurity policies can name it.
RUN groupadd --system --gid 10001 chatkit \
 && useradd --system --uid 10001 --gid chatkit --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin chatkit

# Code and virtual environment are owned by root and read-only for the service user.
COPY --from=builder /app /app

WORKDIR /app

# PORT: where uvicorn listens (the app's PORT setting).
# FORWARDED_ALLOW_IPS: read by uvicorn itself; only these peers may set X-Forwarded-For/-Proto.
#   The default trusts nobody but loopback: set it to the reverse proxy's address (compose
#   does). Never "*" when the port is reachable by anything but the proxy.
# GRACEFUL_SHUTDOWN_SECONDS: after SIGTERM, uvicorn waits this long for open connections: a
#   backstop longer than the app's SHUTDOWN_GRACE_SECONDS + 5, by which the app has ended every
#   stream itself (with an error event, the partial reply stored; docs/runs.md).
# KEEPALIVE_SECONDS: idle keep-alive of upstream connections; longer than nginx's upstream
#   keepalive_timeout (60 s), so nginx, not uvicorn, closes idle pooled connections.
ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/tmp/chatkit-pg \
    PORT=8000 \
    FORWARDED_ALLOW_IPS=127.0.0.1 \
    GRACEFUL_SHUTDOWN_SECONDS=20 \
    KEEPALIVE_SECONDS=75

# Numeric, so Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

EXPOSE 8000

# Liveness only (no database round trip): python is already here, so no curl is installed.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)"]

STOPSIGNAL SIGTERM

# exec: uvicorn replaces the shell and is PID 1, so it receives SIGTERM from `docker stop`.
# Migrations are not run here: the compose `migrate` service (or the operator) runs
# `python -m app migrate` once, before any replica starts.
CMD ["sh", "-c", "exec uvicorn app.main:create_app --factory --host 0.0.0.0 --port \"$PORT\" --loop uvloop --http httptools --proxy-headers --forwarded-allow-ips \"$FORWARDED_ALLOW_IPS\" --timeout-keep-alive \"$KEEPALIVE_SECONDS\" --timeout-graceful-shutdown \"$GRACEFUL_SHUTDOWN_SECONDS\" --no-server-header --no-access-log"]
