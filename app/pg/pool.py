"""``ConnectionPool``: the plain asyncpg pool the store, the limits, the attachments and the
plugins borrow from (each through app.pg.calls, handed the pool by the lifespan).

Why not SQLAlchemy's pool (which the app used before, and which Alembic still uses): a checkout
through it costs two greenlet hops and its bookkeeping, about half of a point read's time on the
server; and its overflow connections are closed as soon as they come back, so a busy process
keeps opening connections (339 during the 500-stream soak of docs/reliability.md). asyncpg's
own pool hands out a connection with no hop and keeps every connection it opened until it has
been idle for ``IDLE_SECONDS`` (0 new connections during the same soak); the counters below
answer what the tests and the soak run ask of it.

Nothing connects when the pool is made: the first borrower opens the first connection, so the
app starts (and says so on ``/readyz``) while PostgreSQL is still coming up.

A connection goes back to the pool without asyncpg's reset query (``RESET ALL``,
``UNLISTEN *``, ...: one more round trip per borrow). That is safe because everything the app
runs is transaction-scoped: ``set_config(..., true)``, ``SET LOCAL``, transaction advisory
locks; an open transaction is still rolled back (asyncpg always does that). Code that hands a
connection to someone else's code (plugins, ``app.chat.plugins``) resets it itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Protocol

import asyncpg
from sqlalchemy.engine import make_url

from app.pg.engine import BoundedCancelConnection, is_disconnect, server_settings
from app.settings import Settings

log = logging.getLogger(__name__)

IDLE_SECONDS = 300.0
"""A connection unused this long is closed (asyncpg's default); busy ones stay open."""


def asyncpg_dsn(url: str) -> str:
    """The libpq-style DSN asyncpg takes, from the app's ``postgresql+asyncpg://`` URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PoolObserver(Protocol):
    """Told how long each borrow waited for a connection and how long it held it (the soak
    run's instrument; nothing is timed while no observer is set)."""

    def borrowed(self, waited: float) -> None: ...

    def returned(self, held: float) -> None: ...


# Run on every new connection (and again after a full reset): on one node, every statement gets
# a generic plan. The store's statements are prepared once per connection and run with new
# parameters each time; left to choose, PostgreSQL kept re-planning the page queries for every
# call, which cost more than the statement itself in a large thread (docs/benchmarks.md). Their
# generic plans are the index range scans the custom ones are (tests/pg/test_rls.py checks
# every statement's plan in both modes). On a Citus cluster the
# default stays: Citus refuses a forced generic plan for a statement it cannot route without
# its parameters.
SQL_SESSION_SETUP = (
    "SELECT CASE WHEN EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') "
    "THEN current_setting('plan_cache_mode') "
    "ELSE set_config('plan_cache_mode', 'force_generic_plan', false) END"
)


_CUT_SHORT = (asyncio.CancelledError, TimeoutError)
"""How a borrow ends when its caller gave up on it: the connection may be mid-query."""


def abandoned_here() -> int:
    """How many connections the pool gave up on mid-call in this task so far: a call that
    failed while this grew may have left its statement in the server's hands (its outcome is
    unknown); one that failed without (no connection, refused) certainly did nothing."""
    return _abandoned_here.get()


# Set in the borrower's own task (``__aexit__`` runs in it): the caller sees it.
_abandoned_here: ContextVar[int] = ContextVar("abandoned_here", default=0)
MAX_ABANDONED = 1000
FENCE_POLL_SECONDS = 0.05
# The backends the pool gave up on that still run: same database and role, and started before
# the pool gave up on them ($2: seconds ago), so a pid the system reused since is not one.
_ABANDONED = (
    "FROM pg_stat_activity a JOIN unnest($1::int[], $2::float8[]) AS g(pid, age) "
    "ON g.pid = a.pid WHERE a.datname = current_database() AND a.usename = current_user "
    "AND a.backend_start < now() - make_interval(secs => g.age)"
)
SQL_TERMINATE_ABANDONED = f"SELECT pg_terminate_backend(a.pid) {_ABANDONED}"
SQL_COUNT_ABANDONED = f"SELECT count(*) {_ABANDONED}"


async def _no_reset(conn: asyncpg.Connection) -> None:
    """asyncpg has already rolled back any open transaction; the app leaves no session state."""


class ConnectionPool:
    """An asyncpg pool plus the counters operators and tests read (in use, peak, opened)."""

    def __init__(
        self,
        url: str,
        settings: Settings,
        *,
        session: Mapping[str, str] | None = None,
        size: int | None = None,
    ) -> None:
        self.acquire_timeout = settings.db_pool_timeout
        # The app's pool: DB_POOL_SIZE + DB_MAX_OVERFLOW; another (the run log's) sets its own.
        self.max_size = size or settings.db_pool_size + settings.db_max_overflow
        self.in_use = 0  # borrowed by the app's code now
        self.waiting = 0  # borrowers waiting for a connection
        # Borrowed and not yet back in asyncpg's hands: in use, plus returns in flight (a return
        # completes in a task of asyncpg's, and the next borrower may run before it resumes us).
        self._outstanding = 0
        self.peak_in_use = 0
        self.connects = 0  # connections opened since the start: churn shows here
        # A plan-cache mode the caller pins (tests check plans in each mode) is left alone.
        self._generic_plans = "plan_cache_mode" not in (session or {})
        self.observer: PoolObserver | None = None
        # Server pid → when the pool gave up on that connection after a failure that may have
        # left a statement in the server's hands (see ``fence``).
        self.abandoned: dict[int, float] = {}
        # Whether the database is a Citus cluster: asked by the first write (app.pg.calls).
        self.citus: bool | None = None
        self.pool = asyncpg.create_pool(
            asyncpg_dsn(url),
            min_size=0,
            max_size=self.max_size,
            max_inactive_connection_lifetime=IDLE_SECONDS,
            init=self._opened,
            reset=_no_reset,
            connection_class=BoundedCancelConnection,
            server_settings=server_settings(settings) | dict(session or {}),
            timeout=settings.db_connect_timeout,
            # Client side: ends a statement the server never saw (a hung network), where
            # statement_timeout cannot; 0 (no statement timeout) disables it too.
            command_timeout=settings.db_statement_timeout_ms / 1000 * 2 or None,
        )

    async def _opened(self, conn: asyncpg.Connection) -> None:
        self.connects += 1
        await self.setup_session(conn)

    async def setup_session(self, conn: asyncpg.Connection) -> None:
        """The session settings every connection of the pool carries (see SQL_SESSION_SETUP);
        again after code that resets the session (``RESET ALL``) hands it back."""
        if self._generic_plans:
            await conn.execute(SQL_SESSION_SETUP)

    async def open(self) -> ConnectionPool:
        """Set the pool up (no connection is opened yet)."""
        await self.pool
        return self

    async def close(self) -> None:
        """Close every connection, waiting for borrowed ones for a few seconds at most."""
        try:
            await asyncio.wait_for(self.pool.close(), timeout=5)
        except TimeoutError:
            self.pool.terminate()

    def size(self) -> int:
        """Connections open now (borrowed or idle)."""
        return int(self.pool.get_size())

    def abandon(self, server_pid: int) -> None:
        """Remember a connection given up on with a statement perhaps still in the server's
        hands (a command timeout while the server was stalled): it may yet commit."""
        _abandoned_here.set(_abandoned_here.get() + 1)
        if len(self.abandoned) >= MAX_ABANDONED:
            del self.abandoned[next(iter(self.abandoned))]  # the oldest: long settled
        self.abandoned[server_pid] = time.monotonic()

    async def fence(self) -> None:
        """Return once no backend the pool gave up on is running: each one still there is
        terminated first. Then nothing it was sent can commit any more, and what it did commit
        can be read. Raises if the database does not answer (the caller retries later); the
        caller bounds the wait."""
        if not self.abandoned:
            return
        given_up = dict(self.abandoned)
        pids = list(given_up)
        async with self.acquire() as conn:
            ages = [time.monotonic() - given_up[pid] for pid in pids]
            await conn.fetch(SQL_TERMINATE_ABANDONED, pids, ages)
            while await conn.fetchval(SQL_COUNT_ABANDONED, pids, ages):
                await asyncio.sleep(FENCE_POLL_SECONDS)
                ages = [time.monotonic() - given_up[pid] for pid in pids]
        for pid in pids:
            if self.abandoned.get(pid) == given_up[pid]:
                del self.abandoned[pid]

    def acquire(self) -> _Borrow:
        """Borrow a connection for one short call (``async with pool.acquire() as conn``).

        Its return never waits on the server: a borrow cut short by a deadline or a
        cancellation closes its connection at once (its query may still be running on a
        server that does not answer). A connection that failed in a way that leaves it
        unusable is closed, and the rest of its generation is renewed on their next borrow (a
        server restart closes them all, and not every closed socket is noticed before it is
        used)."""
        return _Borrow(self)


class _Borrow:
    """One borrow. A class rather than ``@asynccontextmanager`` (no generator per call), and
    the wait is bounded with ``asyncio.timeout`` rather than asyncpg's ``acquire(timeout=)``,
    which wraps every acquire in a task (``wait_for``) on Python 3.11."""

    __slots__ = ("_conn", "_owner", "_pid", "_started")

    def __init__(self, owner: ConnectionPool) -> None:
        self._owner = owner
        self._conn: asyncpg.Connection | None = None
        self._pid = 0  # the server process (asyncpg may detach a lost connection before exit)
        self._started = 0.0

    async def __aenter__(self) -> asyncpg.Connection:
        owner = self._owner
        observer = owner.observer
        if observer is not None:
            self._started = time.monotonic()
        owner.waiting += 1
        try:
            if owner.waiting + owner._outstanding <= owner.max_size:
                # A connection holder is free for certain (every borrow and return is counted
                # here, a return only once asyncpg has its holder back): no wait to bound, and
                # no timer to arm. Opening a connection is bounded by DB_CONNECT_TIMEOUT.
                conn: asyncpg.Connection = await owner.pool.acquire()
            else:
                async with asyncio.timeout(owner.acquire_timeout):
                    conn = await owner.pool.acquire()
        finally:
            owner.waiting -= 1
        self._conn = conn
        self._pid = conn.get_server_pid()
        owner._outstanding += 1
        owner.in_use += 1
        if owner.in_use > owner.peak_in_use:
            owner.peak_in_use = owner.in_use
        if observer is not None:
            got = time.monotonic()
            observer.borrowed(got - self._started)
            self._started = got
        return conn

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        owner, conn = self._owner, self._conn
        assert conn is not None
        owner.in_use -= 1
        if owner.observer is not None:
            owner.observer.returned(time.monotonic() - self._started)
        try:
            # Cut short (a deadline, a cancellation, asyncpg's command timeout): the query
            # may still be running, and asyncpg would make the return wait until PostgreSQL
            # confirms a cancel request, which a frozen server never does (see
            # app.pg.engine.BoundedCancelConnection). The caller's time is up: the connection goes
            # at once, and the pool opens a new one when it is next needed. PostgreSQL ends
            # the old backend's query when it next writes to the closed socket, or at its
            # statement_timeout.
            cut_short = isinstance(exc, _CUT_SHORT)
            # Unusable (the server closed it, or did not answer in time: TimeoutError is an
            # OSError): the rest of its generation is suspect too and is renewed.
            gone = exc is not None and is_disconnect(exc)
            if cut_short or gone:
                # Its statement, if it reached the server, may still commit (app.chat.settle).
                owner.abandon(self._pid)
            if (cut_short or gone) and not conn.is_closed():
                conn.terminate()
            if gone:
                await owner.pool.expire_connections()
            # asyncpg shields the release itself: it completes even if we are cancelled here.
            await owner.pool.release(conn)
        except Exception as failure:  # a broken connection is closed by asyncpg; nothing to do
            log.debug("connection not returned cleanly", extra={"reason": type(failure).__name__})
        finally:
            owner._outstanding -= 1


async def open_pool(
    url: str,
    settings: Settings,
    *,
    session: Mapping[str, str] | None = None,
    size: int | None = None,
) -> ConnectionPool:
    """A ready pool; ``session`` adds settings for every connection (tests pin plan modes),
    ``size`` sets its connections (else DB_POOL_SIZE + DB_MAX_OVERFLOW)."""
    return await ConnectionPool(url, settings, session=session, size=size).open()
