"""Deadlines that hold while PostgreSQL hangs: a private server (tests/harness/pginstance.py) frozen
with ``SIGSTOP`` on its postmaster and every backend (tests/harness/pgfreeze.py), as a hung host or a
stalled disk leaves it: sockets open, connections accepted into the listen queue, nothing
answered. Then ``SIGCONT``, and the same app must serve again at once.

What must hold: ``/readyz`` answers 503 within ``READY_TIMEOUT_SECONDS`` (it took 23 s with a
3 s deadline: asyncpg made the cut-off connection's return wait for PostgreSQL to confirm a
cancel request, up to its command timeout of twice ``DB_STATEMENT_TIMEOUT_MS``); a borrow cut
off by any deadline costs its connection, never a wait; every request that needs the database
is a 503 with ``Retry-After`` within the bound its settings promise (the command timeout, the
connect timeout, the pool timeout); and after ``SIGCONT`` the first request succeeds.

Bounds are generous next to the configured deadlines (1 s here; the old code took 20 s and
more) so a loaded machine cannot fail them, and far below what the old code took. Timings are
printed (``-s``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, ExitStack
from typing import Any

import asyncpg
import httpx
import pytest

from app.errors import ServiceUnavailableError
from app.main import create_app
from app.pg.pool import ConnectionPool, open_pool
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.conftest import TABLES
from tests.harness.chatkit_client import done_items, of_type, user_input
from tests.harness.loopback import serve
from tests.harness.pg import migrate
from tests.harness.pgfreeze import frozen
from tests.harness.pginstance import PgInstance, private_postgres
from tests.http.test_faults import DEADLINE, GatedModel, assert_unavailable, now
from tests.pg.test_pg_restart import Served

DATABASE = "ckpg_frozen"
APP_NAME = "chatkit-pg-frozen"
CUT_OFF = 1.0  # the deadline a test configures (READY_TIMEOUT_SECONDS, its own asyncio.timeout)
# Every answer while frozen comes within this; the old code took the command timeout on top
# of the deadline (20 s with the default DB_STATEMENT_TIMEOUT_MS).
FROZEN_BOUND = 5.0


def report(what: str, seconds: float) -> None:
    print(f"\n[pg-frozen] {what}: {seconds * 1000:.0f} ms")


async def within(call: Awaitable[Any], what: str, bound: float = FROZEN_BOUND) -> Any:
    """Await ``call``; fail (rather than wait on) if it takes longer than ``bound``."""
    started = now()
    try:
        async with asyncio.timeout(bound) as limit:
            return await call
    except TimeoutError:
        if limit.expired():  # not a TimeoutError of the call's own
            pytest.fail(f"{what}: still waiting after {bound:.0f} s with PostgreSQL frozen")
        raise
    finally:
        report(what, now() - started)


# --- the private server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PgInstance]:
    with private_postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
async def frozen_url(private_pg: PgInstance) -> str:
    """A database on the private server, migrated with Alembic."""
    conn = await asyncpg.connect(private_pg.dsn())
    try:
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    url = private_pg.url(DATABASE)
    await asyncio.to_thread(migrate, url)
    return url


@pytest.fixture
async def pg(private_pg: PgInstance, frozen_url: str) -> AsyncIterator[PgInstance]:
    """The private server (never left frozen: ``frozen`` continues it on the way out), with
    empty tables after the test."""
    yield private_pg
    conn = await asyncpg.connect(private_pg.dsn(DATABASE), timeout=DEADLINE)
    try:
        await conn.execute(f"TRUNCATE {TABLES} CASCADE")
    finally:
        await conn.close()


async def backends(pg: PgInstance) -> set[int]:
    """The server pids of the connections the apps and pools of these tests hold."""
    conn = await asyncpg.connect(pg.dsn(DATABASE), timeout=DEADLINE)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", APP_NAME
        )
    finally:
        await conn.close()
    return {int(row["pid"]) for row in rows}


@pytest.fixture
def frozen_settings(app_settings: Settings, frozen_url: str) -> Settings:
    """The defaults that matter are kept: DB_STATEMENT_TIMEOUT_MS 10 s (asyncpg's command
    timeout 20 s) and DB_CONNECT_TIMEOUT 5 s, both far above the deadlines under test."""
    return app_settings.model_copy(
        update={"database_url": frozen_url, "db_application_name": APP_NAME}
    )


@pytest.fixture
async def served(frozen_settings: Settings) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """``await served(**settings)``: an app under uvicorn on the private server."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Served:
            settings = frozen_settings.model_copy(update=overrides)
            model = GatedModel()
            model.gate.set()
            app = create_app(settings, model=model)
            base = await stack.enter_async_context(serve(app))
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=60))
            return Served(app, http, settings)

        yield start


@pytest.fixture
async def make_pool(frozen_settings: Settings) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``await make_pool(**settings)``: the app's kind of pool on the private server."""
    pools: list[ConnectionPool] = []

    async def make(**overrides: Any) -> ConnectionPool:
        settings = frozen_settings.model_copy(update=overrides)
        assert settings.database_url is not None
        pool = await open_pool(settings.database_url, settings)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


# --- /readyz ------------------------------------------------------------------------------------


async def test_readyz_answers_within_its_deadline_while_postgres_is_frozen(
    pg: PgInstance, served: Callable[..., Awaitable[Served]]
) -> None:
    """The reproduction: ``/readyz`` on a frozen server. First on the pooled connection (its
    query cut off by the deadline), then on a new one (its connect cut off: the connect
    timeout, 5 s, is longer than the deadline). Both 503 within the bound; after ``SIGCONT``
    the very next probe is 200."""
    app = await served(ready_timeout_seconds=CUT_OFF)
    assert (await app.http.get("/readyz")).status_code == 200  # one pooled connection
    assert app.pg.pool.size() == 1
    before = await backends(pg)
    with frozen(pg):
        for what in ("pooled connection", "new connection"):
            ready = await within(app.http.get("/readyz"), f"/readyz on a {what}")
            assert ready.status_code == 503, ready.text
            assert ready.json() == {"status": "unavailable", "database": "unreachable"}
            # The cut-off connection was closed, not handed back to wait on the server.
            assert app.pg.pool.size() == 0 and app.pg.pool.in_use == 0
        assert (await app.http.get("/healthz")).status_code == 200
    ready = await within(app.http.get("/readyz"), "/readyz after SIGCONT")
    assert ready.status_code == 200, ready.text
    assert app.pg.pool.size() == 1
    # The abandoned backend ends once it runs again and finds its client gone.
    async with asyncio.timeout(DEADLINE):
        while (await backends(pg)) & before:
            await asyncio.sleep(0.02)


# --- the pool -----------------------------------------------------------------------------------


@pytest.mark.parametrize("deadline", ["around the borrow", "around the statement"])
@pytest.mark.parametrize("in_transaction", [False, True], ids=["statement", "transaction"])
async def test_a_borrow_cut_off_by_a_deadline_costs_its_connection_not_a_wait(
    pg: PgInstance,
    make_pool: Callable[..., Awaitable[ConnectionPool]],
    in_transaction: bool,
    deadline: str,
) -> None:
    """Any caller's deadline (not only /readyz's) ends its borrow on time: the query's
    connection is terminated at once, inside a transaction too (its ROLLBACK cannot wait on
    the cancel either: app.pg.engine.BoundedCancelConnection gives it ``CANCEL_GRACE_SECONDS``). A deadline around
    the borrow (as /readyz's) ends it with a CancelledError; one inside it, with the
    TimeoutError the deadline raises. Old code: the deadline plus the command timeout, 21 s,
    except for one statement under a deadline inside the borrow (a TimeoutError, which is an
    OSError, already closed the connection)."""
    pool = await make_pool(db_pool_size=1, db_max_overflow=0)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT 1") == 1
    outer = asyncio.timeout(CUT_OFF if deadline == "around the borrow" else None)
    inner = asyncio.timeout(CUT_OFF if deadline == "around the statement" else None)
    what = f"{'a transaction' if in_transaction else 'a statement'} cut off {deadline}"

    with ExitStack() as freezing:  # frozen from the query until the borrow has ended

        async def cut_off() -> None:
            async with outer, pool.acquire() as conn, AsyncExitStack() as stack:
                if in_transaction:
                    await stack.enter_async_context(conn.transaction())
                    await conn.execute("SELECT 1")
                freezing.enter_context(frozen(pg))
                async with inner:
                    await conn.fetchval("SELECT 1")

        # The deadline's TimeoutError; in a transaction, the ROLLBACK's "connection is
        # closed" (the cancel was not confirmed within the grace, so the connection is gone).
        with pytest.raises((TimeoutError, asyncpg.InterfaceError)):
            await within(cut_off(), what)
        assert pool.in_use == 0 and pool.size() == 0
    async with pool.acquire() as conn:  # the server runs again: a new connection, at once
        assert await conn.fetchval("SELECT 1") == 1


async def test_pool_and_connect_timeouts_hold_while_postgres_is_frozen(
    pg: PgInstance, make_pool: Callable[..., Awaitable[ConnectionPool]]
) -> None:
    """The other promises: a statement ends at asyncpg's command timeout (twice
    DB_STATEMENT_TIMEOUT_MS), a new connection at DB_CONNECT_TIMEOUT, a wait for a pooled
    connection at DB_POOL_TIMEOUT, each as ``ServiceUnavailableError`` through the store."""
    context = {"user_id": "alice"}
    pool = await make_pool(
        db_pool_size=1,
        db_max_overflow=0,
        db_statement_timeout_ms=500,  # command timeout 1 s
        db_connect_timeout=CUT_OFF,
    )
    store = PostgresStore(pool)
    await store.load_threads(10, None, "desc", context)  # one pooled connection
    with frozen(pg):
        with pytest.raises(ServiceUnavailableError):
            await within(store.load_threads(10, None, "desc", context), "command timeout")
        assert pool.size() == 0 and pool.in_use == 0
        with pytest.raises(ServiceUnavailableError):
            await within(store.load_threads(10, None, "desc", context), "connect timeout")
        assert pool.size() == 0 and pool.in_use == 0

    # The only connection is held by a statement that waits on the frozen server (for the
    # command timeout, 20 s): the next borrower waits DB_POOL_TIMEOUT for it, no longer.
    busy = await make_pool(db_pool_size=1, db_max_overflow=0, db_pool_timeout=CUT_OFF)
    busy_store = PostgresStore(busy)
    await busy_store.load_threads(10, None, "desc", context)
    with frozen(pg):
        holding = asyncio.Event()

        async def hold() -> None:
            async with busy.acquire() as conn:
                holding.set()
                await conn.fetchval("SELECT 1")

        holder = asyncio.create_task(hold())
        try:
            await asyncio.wait_for(holding.wait(), DEADLINE)
            with pytest.raises(ServiceUnavailableError):
                await within(busy_store.load_threads(10, None, "desc", context), "pool timeout")
        finally:
            holder.cancel()
            await within(asyncio.gather(holder, return_exceptions=True), "the holder cancelled")
        assert busy.size() == 0 and busy.in_use == 0

    for each in (store, busy_store):
        threads = await within(each.load_threads(10, None, "desc", context), "after SIGCONT")
        assert threads.data == []


# --- requests -----------------------------------------------------------------------------------


async def test_requests_are_503_within_their_bounds_while_postgres_is_frozen(
    pg: PgInstance, served: Callable[..., Awaitable[Served]]
) -> None:
    """Requests that need the database while it is frozen, more of them at once than the
    pool holds: each a 503 JSON answer with ``Retry-After`` within the bound (command, pool
    and connect timeouts of 1 s each), never a hang; after ``SIGCONT`` they succeed."""
    app = await served(
        db_pool_size=2,
        db_max_overflow=0,
        db_statement_timeout_ms=500,
        db_connect_timeout=CUT_OFF,
        db_pool_timeout=CUT_OFF,
        ready_timeout_seconds=CUT_OFF,
    )
    events = await app.stream("threads.create", {"input": user_input("Before the freeze")})
    assert done_items(events, "assistant_message"), events
    thread_id = of_type(events, "thread.created")[0]["thread"]["id"]
    with frozen(pg):
        calls = [
            app.request("threads.list", {}),
            app.request("items.list", {"thread_id": thread_id}),
            app.request("threads.get_by_id", {"thread_id": thread_id}),
            app.request("threads.update", {"thread_id": thread_id, "title": "Renamed"}),
            app.request("threads.create", {"input": user_input("During the freeze")}),
        ]
        answers = await within(asyncio.gather(*calls), f"{len(calls)} requests at once")
        for answer in answers:
            assert_unavailable(answer)
        ready = await within(app.http.get("/readyz"), "/readyz")
        assert ready.status_code == 503
        assert app.pg.pool.in_use == 0
    listed = await within(app.request("threads.list", {}), "threads.list after SIGCONT")
    assert listed.status_code == 200, listed.text
    assert [t["id"] for t in listed.json()["data"]] == [thread_id]
    again = await within(
        app.stream(
            "threads.add_user_message", {"thread_id": thread_id, "input": user_input("Back")}
        ),
        "a reply after SIGCONT",
    )
    assert done_items(again, "assistant_message"), again
