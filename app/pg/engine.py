"""Engine construction and the embedded PostgreSQL used when no DATABASE_URL is configured."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.settings import Settings, normalise_database_url

log = logging.getLogger(__name__)


def start_embedded_postgres(settings: Settings) -> str:
    """Start (or reuse) the embedded server in DATA_DIR and return its asyncpg URL.

    Blocking: call it from a thread when an event loop is running."""
    from app.pg.embedded import embedded_url

    return normalise_database_url(
        embedded_url(settings.embedded_pg_dir, settings.embedded_postgres_bin)
    )


def resolve_database_url(settings: Settings) -> str:
    """A configured DATABASE_URL always wins; otherwise the embedded server is used."""
    if settings.database_url:
        return settings.database_url
    return start_embedded_postgres(settings)


async def aresolve_database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    return await asyncio.to_thread(start_embedded_postgres, settings)


CANCEL_GRACE_SECONDS = 1.0
"""How long a cancelled query's connection may wait for PostgreSQL to confirm the cancel."""


class BoundedCancelConnection(asyncpg.Connection):  # type: ignore[misc]  # untyped base
    """asyncpg's connection, whose cancellation of an abandoned query gives up quickly.

    When a query is abandoned (its task cancelled by a deadline or a client that went away,
    or asyncpg's ``command_timeout``), asyncpg sends PostgreSQL a cancel request on a new
    connection and waits for the server to confirm it on this one: until then the connection
    can run nothing, so a ``ROLLBACK`` or a return to the pool waits too. It bounds that wait
    with the command timeout, twice ``DB_STATEMENT_TIMEOUT_MS`` (20 s by default), and a
    frozen server (a hung host, a stalled disk) accepts the cancel connection and never
    answers: ``/readyz`` answered after 23 s though its deadline was 3. A healthy server
    confirms within milliseconds; one that has not after ``CANCEL_GRACE_SECONDS`` is not
    answering, and the connection is terminated, which releases every waiter at once. The
    pool (app.pg.pool) does not even wait that long: it terminates a connection whose borrow was
    cut short rather than returning it.
    """

    async def _cancel(self, waiter: Any, cancel_waiter: Any = None) -> None:
        # asyncpg's own ``_cancel`` (run as a task of this connection's) swallows the
        # CancelledError of the grace's expiry and completes ``waiter`` itself.
        async with asyncio.timeout(CANCEL_GRACE_SECONDS) as grace:
            await super()._cancel(waiter, cancel_waiter)
        if grace.expired() and not self.is_closed():
            self.terminate()


def server_settings(settings: Settings) -> dict[str, str]:
    """Per-connection GUCs: every session gets the timeouts, whoever checks it out."""
    return {
        "application_name": settings.db_application_name,
        "statement_timeout": str(settings.db_statement_timeout_ms),
        "lock_timeout": str(settings.db_lock_timeout_ms),
        "idle_in_transaction_session_timeout": "60000",
    }


# Failures that say "the database is not there right now" (down, restarting, overloaded, a
# connection cut, a statement or lock timeout): the request may succeed if retried later, so
# the client gets 503 with Retry-After rather than a 500.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, DNS
    TimeoutError,  # connect timeout, asyncpg's command_timeout
    asyncpg.PostgresConnectionError,  # incl. "connection does not exist"
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, restart, statement_timeout
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, out of memory
    asyncpg.exceptions.TransactionRollbackError,  # deadlock, serialization failure
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout
    asyncpg.exceptions.UndefinedTableError,  # migrations not run yet (/readyz says so too)
    # The server's FATAL goodbye (shutdown, pg_terminate_backend) read before its end of file:
    # asyncpg's protocol is left in an error state ("cannot switch to state N; another
    # operation is in progress") until the close arrives, so a checkout in between still
    # looks open. A real client bug would land here too; dropping the connection is right.
    asyncpg.exceptions.InternalClientError,
    sa_exc.TimeoutError,  # no pooled connection free within DB_POOL_TIMEOUT
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) means the database is unavailable for now."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return False
        if isinstance(seen, _UNAVAILABLE):
            return True
        if isinstance(seen, asyncpg.InterfaceError) and "closed" in str(seen):
            return True
        if isinstance(seen, sa_exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


def is_disconnect(exc: BaseException) -> bool:
    """Whether the connection ``exc`` came from can no longer be used."""
    return isinstance(
        exc,
        OSError
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.AdminShutdownError
        | asyncpg.exceptions.CrashShutdownError
        | asyncpg.exceptions.CannotConnectNowError
        | asyncpg.exceptions.InternalClientError,
    ) or (isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc))


def _drop_closed_connections(dbapi_conn: Any, record: Any, proxy: Any) -> None:
    """A pooled connection the server has closed (a restart, ``pg_terminate_backend``) is
    noticed by asyncpg as soon as the socket says so; checking that costs no round trip.
    Finding one means the others of its generation are likely gone too, so the whole pool is
    renewed (SQLAlchemy then hands out a fresh connection for this checkout)."""
    if dbapi_conn.driver_connection.is_closed():
        raise sa_exc.InvalidatePoolError("pooled connection closed by the server")


def create_engine(url: str, settings: Settings) -> AsyncEngine:
    engine = _create_engine(url, settings)
    event.listen(engine.sync_engine, "checkout", _drop_closed_connections)
    return engine


def _create_engine(url: str, settings: Settings) -> AsyncEngine:
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
            "connection_class": BoundedCancelConnection,
            # Client side: ends a statement the server never saw (a hung network), where
            # statement_timeout cannot; 0 (no statement timeout) disables it too.
            "command_timeout": settings.db_statement_timeout_ms / 1000 * 2 or None,
        },
    )
