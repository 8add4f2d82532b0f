"""Operational routes: liveness, readiness (database and schema) and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import asyncpg
from alembic.script import ScriptDirectory
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.http.runtime import Runtime
from app.pg.engine import alembic_config
from app.pg.store import SQL_ROW_SECURITY_ACTIVE

log = logging.getLogger(__name__)

router = APIRouter()


def alembic_heads(plugin_locations: Sequence[Path] = ()) -> frozenset[str]:
    """The revisions ``python -m app migrate`` leads to (read from the migration scripts):
    the app's head and the head of each plugin's branch."""
    return frozenset(
        ScriptDirectory.from_config(alembic_config(None, plugin_locations)).get_heads()
    )


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Whether this process can serve: it is not shutting down, its database answers and its
    schema is at the head.

    Answers within ``READY_TIMEOUT_SECONDS`` whatever the database does: the deadline covers
    the borrow (a new connection included) and the queries, and a connection cut off by it
    is terminated rather than waited for (app.pg.pool), so a frozen PostgreSQL is a prompt 503
    and not a probe that times out on the orchestrator's side."""
    runtime: Runtime = request.app.state.runtime
    if runtime.drain is not None and runtime.drain.draining:
        # SIGTERM: take no more traffic (app.http.drain); the replies in progress go on.
        return JSONResponse({"status": "draining"}, 503)
    try:
        async with asyncio.timeout(runtime.settings.ready_timeout_seconds):
            async with runtime.pool.acquire() as conn:
                rows = await conn.fetch("SELECT version_num FROM alembic_version")
                versions = frozenset(str(r[0]) for r in rows)
                if runtime.row_security is None and versions == runtime.alembic_heads:
                    enforced = await conn.fetchval(SQL_ROW_SECURITY_ACTIVE)
                    runtime.row_security = bool(enforced)
                    _report_row_security(runtime)
    except asyncpg.UndefinedTableError:
        return JSONResponse({"status": "unavailable", "database": "ok", "schema": "missing"}, 503)
    except Exception as exc:
        log.warning("readiness: database unreachable", extra={"reason": type(exc).__name__})
        return JSONResponse({"status": "unavailable", "database": "unreachable"}, 503)
    if versions != runtime.alembic_heads:
        return JSONResponse(
            {"status": "unavailable", "database": "ok", "schema": "not at the latest migration"},
            503,
        )
    return JSONResponse({"status": "ready", "database": "ok", "schema": "ok"})


def _report_row_security(runtime: Runtime) -> None:
    """Once per process: say whether row-level security guards this app's connections."""
    if runtime.row_security:
        log.info("row-level security is enforced for the app's database role")
    elif runtime.settings.database_url is None:
        log.info("row-level security is bypassed (the embedded development database)")
    else:
        log.warning(
            "row-level security is bypassed: the app connects as a superuser, the tables' "
            "owner or a BYPASSRLS role, so its own user_id filters are the only wall; "
            "connect as the chatkit_app role (docs/rls.md)"
        )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
