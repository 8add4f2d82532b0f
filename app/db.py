"""Engine construction and the embedded PostgreSQL used when no DATABASE_URL is configured."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .settings import Settings, normalise_database_url

log = logging.getLogger(__name__)

_embedded_lock = threading.Lock()
_embedded: dict[str, Any] = {}


def start_embedded_postgres(settings: Settings) -> str:
    """Start (or reuse) the pgserver instance in DATA_DIR and return its asyncpg URL.

    Blocking: call it from a thread when an event loop is running.
    """
    from pgserver import get_server  # type: ignore[attr-defined]

    pgdata = settings.embedded_pg_dir
    key = str(pgdata)
    with _embedded_lock:
        if key not in _embedded:
            pgdata.parent.mkdir(parents=True, exist_ok=True)
            log.info("starting embedded PostgreSQL in %s", pgdata)
            _embedded[key] = get_server(pgdata, cleanup_mode="stop")
        server = _embedded[key]
    return normalise_database_url(server.get_uri())


def resolve_database_url(settings: Settings) -> str:
    """A configured DATABASE_URL always wins; otherwise the embedded server is used."""
    if settings.database_url:
        return settings.database_url
    return start_embedded_postgres(settings)


async def aresolve_database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    return await asyncio.to_thread(start_embedded_postgres, settings)


def server_settings(settings: Settings) -> dict[str, str]:
    """Per-connection GUCs: every session gets the timeouts, whoever checks it out."""
    return {
        "application_name": "chatkit-pg",
        "statement_timeout": str(settings.db_statement_timeout_ms),
        "lock_timeout": str(settings.db_lock_timeout_ms),
        "idle_in_transaction_session_timeout": "60000",
    }


def create_engine(url: str, settings: Settings) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={
            "server_settings": server_settings(settings),
            "timeout": settings.db_connect_timeout,
            "command_timeout": max(settings.db_statement_timeout_ms / 1000 * 2, 30),
        },
    )
