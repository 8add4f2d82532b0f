"""A real PostgreSQL restart, not a simulated one: a private server (tests/harness/pginstance.py) that
``pg_ctl`` stops with ``-m fast`` (every backend terminated, the postmaster gone, its socket
removed) and starts again, under the app served by a real uvicorn.

tests/http/test_faults.py fakes the same events with a TCP proxy; here the app meets what PostgreSQL
itself does: ``FATAL: terminating connection due to administrator command`` on every pooled
connection, no socket while it is down, "the database system is shutting down" or "starting
up" in between. What must hold: a reply that needs the database after the stop ends with
ChatKit's ``error`` event; requests during the outage are 503 JSON with ``Retry-After``, within
the configured timeouts; the first request after ``pg_ctl start`` returns succeeds within a
second, with no app restart; nothing half-written stays behind and the thread's stream lease is
released. A restart while the app is idle leaves a pool of dead connections: the first request
after it must still succeed (app/pg/engine.py renews the pool at checkout).

The private server belongs to this module; the session's shared one is never touched. Timings
are printed (``-s``); bounds are generous next to them and every wait polls to a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.errors import ServiceUnavailableError
from app.http.runtime import Runtime
from app.main import create_app
from app.pg.pool import ConnectionPool, open_pool
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.conftest import TABLES
from tests.harness.chatkit_client import done_items, of_type, token_for, user_input
from tests.harness.loopback import serve
from tests.harness.pg import migrate
from tests.harness.pginstance import PgInstance, private_postgres
from tests.http.test_faults import (
    DEADLINE,
    RECOVERY_SECONDS,
    SLACK_SECONDS,
    GatedModel,
    assert_unavailable,
    checked_out,
    now,
    sse_event,
    stream_error,
    until,
    value,
)

CONNECT_TIMEOUT = 1.0  # DB_CONNECT_TIMEOUT of the apps here
REQUEST_BOUND = CONNECT_TIMEOUT + SLACK_SECONDS  # no request during an outage takes longer
APP_NAME = "chatkit-pg-restart"  # application_name of the apps' connections
DATABASE = "ckpg_restart"


def report(what: str, seconds: float) -> None:
    print(f"\n[pg-restart] {what}: {seconds * 1000:.0f} ms")


# --- the private server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PgInstance]:
    with private_postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
async def restart_url(private_pg: PgInstance) -> str:
    """A database on the private server, migrated with Alembic."""
    conn = await asyncpg.connect(private_pg.dsn())
    try:
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    url = private_pg.url(DATABASE)
    await asyncio.to_thread(migrate, url)
    return url


async def ensure_running(pg: PgInstance) -> None:
    if pg.postmaster_pid() is None:
        await asyncio.to_thread(pg.start)


@pytest.fixture
async def pg(private_pg: PgInstance, restart_url: str) -> AsyncIterator[PgInstance]:
    """The private server, running; running again and with empty tables after the test,
    whatever state a failure left it in."""
    await ensure_running(private_pg)
    yield private_pg
    await ensure_running(private_pg)
    conn = await asyncpg.connect(private_pg.dsn(DATABASE))
    try:
        await conn.execute(f"TRUNCATE {TABLES} CASCADE")
    finally:
        await conn.close()


async def fetch(pg: PgInstance, sql: str, *args: Any) -> list[asyncpg.Record]:
    """A statement on a connection of its own (any earlier one died with the server)."""
    conn = await asyncpg.connect(pg.dsn(DATABASE), timeout=DEADLINE)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


async def app_backends(pg: PgInstance) -> dict[int, str]:
    """pid → state of the server processes serving the app's pooled connections."""
    rows = await fetch(
        pg,
        "SELECT pid, state FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
        DATABASE,
        APP_NAME,
    )
    return {row["pid"]: row["state"] for row in rows}


# --- the app --------------------------------------------------------------------------------


@pytest.fixture
def restart_settings(app_settings: Settings, restart_url: str) -> Settings:
    return app_settings.model_copy(
        update={
            "database_url": restart_url,
            "db_connect_timeout": CONNECT_TIMEOUT,
            "db_application_name": APP_NAME,
            "thread_busy_wait_seconds": 2.0,
            # A test that fails while the server is down does not wait long for the
            # background retries (a lease release) when its app stops.
            "shutdown_grace_seconds": 2.0,
        }
    )


class Served:
    """An app under uvicorn on loopback, and an httpx client for it."""

    def __init__(self, app: FastAPI, http: httpx.AsyncClient, settings: Settings) -> None:
        self.app = app
        self.http = http
        self.headers = {"Authorization": f"Bearer {token_for('alice', settings)}"}

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.state.runtime
        return runtime

    @property
    def pool(self) -> ConnectionPool:
        return self.runtime.pool

    async def request(self, type_: str, params: dict[str, Any]) -> httpx.Response:
        body = {"type": type_, "params": params}
        return await self.http.post("/chatkit", json=body, headers=self.headers)

    async def stream(self, type_: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        body = {"type": type_, "params": params}
        async with (
            asyncio.timeout(DEADLINE),
            self.http.stream("POST", "/chatkit", json=body, headers=self.headers) as response,
        ):
            assert response.status_code == 200, await response.aread()
            lines = response.aiter_lines()
            while (event := await sse_event(lines)) is not None:
                events.append(event)
        return events


@pytest.fixture
async def served(restart_settings: Settings) -> AsyncIterator[Any]:
    """``await served(model, **settings)``: a started app; stopped after the test."""
    async with AsyncExitStack() as stack:

        async def start(model: Any, **overrides: Any) -> Served:
            settings = restart_settings.model_copy(update=overrides)
            app = create_app(settings, model=model)
            base = await stack.enter_async_context(serve(app))
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=30))
            return Served(app, http, settings)

        yield start


async def timed(call: Any, bound: float = REQUEST_BOUND) -> tuple[Any, float]:
    """Await ``call``; fail if it takes longer than ``bound`` (a hang), else (result, seconds)."""
    started = now()
    try:
        result = await asyncio.wait_for(call, bound)
    except TimeoutError:
        pytest.fail(f"a request was still waiting after {bound:.1f} s")
    return result, now() - started


# --- 1. PostgreSQL stops while a reply streams, then starts again ------------------------------


async def test_postgres_stopped_during_a_stream(pg: PgInstance, served: Any) -> None:
    """The model is still writing when ``pg_ctl stop -m fast`` returns; its reply then has to
    be saved into a database that is gone. Deterministic: the model is held until the server
    is down and released only then."""
    model = GatedModel()
    app: Served = await served(model)
    pool = app.pg.pool
    body = {"type": "threads.create", "params": {"input": user_input("Tell me everything")}}
    events: list[dict[str, Any]] = []
    async with app.http.stream("POST", "/chatkit", json=body, headers=app.headers) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        while not of_type(events, "thread.item.updated"):  # the first words arrived
            event = await asyncio.wait_for(sse_event(lines), DEADLINE)
            assert event is not None, events
            events.append(event)
        await until(value(lambda: model.waiting == 1), "the model to think")
        assert checked_out(pool) == 0  # the stream holds no connection while it waits
        pooled = await app_backends(pg)
        assert pooled and all(state == "idle" for state in pooled.values()), pooled
        old_postmaster = pg.postmaster_pid()

        stopping = now()
        await asyncio.to_thread(pg.stop, "fast")
        stopped_at = now()
        report("pg_ctl stop -m fast took", stopped_at - stopping)
        assert pg.postmaster_pid() is None
        assert model.waiting == 1  # the reply is still being written

        model.gate.set()  # the model finishes: the reply must be saved now
        async with asyncio.timeout(DEADLINE):
            while (event := await sse_event(lines)) is not None:
                events.append(event)
        ended = now() - stopped_at
    report("stopped during a stream: the stream ended after", ended)
    assert ended < REQUEST_BOUND
    stream_error(events)
    assert not done_items(events, "assistant_message")
    thread_id = of_type(events, "thread.created")[0]["thread"]["id"]
    acknowledged = done_items(events, "user_message")
    assert len(acknowledged) == 1

    # While it is down: 503 JSON with Retry-After, never a hang, a 500 or a half-open stream.
    listed, took = await timed(app.request("threads.list", {}))
    report("while down: threads.list 503 after", took)
    assert_unavailable(listed)
    sent, _ = await timed(
        app.request(
            "threads.add_user_message", {"thread_id": thread_id, "input": user_input("Hello?")}
        )
    )
    assert_unavailable(sent)
    created, _ = await timed(app.request("threads.create", {"input": user_input("New")}))
    assert_unavailable(created)
    ready, _ = await timed(app.http.get("/readyz"))
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "database": "unreachable"}
    assert (await app.http.get("/healthz")).status_code == 200

    await asyncio.to_thread(pg.start)  # returns once the server accepts connections
    back_at = now()
    listed = await app.request("threads.list", {})  # the very first request after
    recovery = now() - back_at
    report("after pg_ctl start: the first request answered after", recovery)
    assert listed.status_code == 200, listed.text
    assert recovery < RECOVERY_SECONDS
    assert [t["id"] for t in listed.json()["data"]] == [thread_id]
    assert (await app.http.get("/readyz")).status_code == 200
    new_postmaster = pg.postmaster_pid()
    assert new_postmaster is not None and new_postmaster != old_postmaster

    # The user retries in the same thread right away: the failed reply's lease is gone.
    started = now()
    again = await app.stream(
        "threads.add_user_message", {"thread_id": thread_id, "input": user_input("Again?")}
    )
    took = now() - started
    report("after pg_ctl start: a new reply in the same thread after", took)
    leases = await fetch(pg, "SELECT thread_id FROM chatkit_stream_leases")
    assert done_items(again, "assistant_message"), (
        f"no reply ({[e['type'] for e in again]}); leases left: {[dict(r) for r in leases]}"
    )
    assert took < RECOVERY_SECONDS

    runtime = app.http.runtime
    await until(value(lambda: len(runtime.tasks) == 0), "background tasks to end")
    await until(value(lambda: checked_out(pool) == 0), "every connection back in the pool")
    assert await fetch(pg, "SELECT id FROM chatkit_stream_leases") == []

    # Stored: the acknowledged user message; not the reply that could not be saved; then the
    # retry and its reply. No item without its thread.
    rows = await fetch(
        pg,
        "SELECT id, type FROM chatkit_items WHERE user_id = 'alice' AND thread_id = $1 "
        "ORDER BY created_at, seq",
        thread_id,
    )
    retry_ids = [done_items(again, "user_message")[0]["id"]]
    retry_ids.append(done_items(again, "assistant_message")[0]["id"])
    assert [(r["type"], r["id"]) for r in rows] == [
        ("user_message", acknowledged[0]["id"]),
        ("user_message", retry_ids[0]),
        ("assistant_message", retry_ids[1]),
    ]
    orphans = await fetch(
        pg,
        "SELECT i.id FROM chatkit_items i LEFT JOIN chatkit_threads t "
        "ON t.user_id = i.user_id AND t.id = i.thread_id WHERE t.id IS NULL",
    )
    assert orphans == []


# --- 2. PostgreSQL restarts while the app is idle ----------------------------------------------


@pytest.mark.parametrize("rate_limit", [100_000, 0], ids=["limiter", "no-limiter"])
async def test_restart_while_idle_renews_the_pool(
    pg: PgInstance, served: Any, rate_limit: int
) -> None:
    """Every pooled connection dies in the restart. The first request afterwards must not be
    a 503: the checkout check (app/pg/engine.py) sees the closed connection and renews the whole
    pool. With the limiter, its upsert is the first statement; without it, the store's."""
    pool_size = 3
    model = GatedModel()
    model.gate.set()
    app: Served = await served(model, db_pool_size=pool_size, rate_limit_per_minute=rate_limit)
    pool = app.pg.pool
    events = await app.stream("threads.create", {"input": user_input("Before the restart")})
    assert done_items(events, "assistant_message"), events
    thread_id = of_type(events, "thread.created")[0]["thread"]["id"]
    # A full pool of idle connections: all of them have to be renewed, not just one.
    async with AsyncExitStack() as held:
        for _ in range(pool_size):
            await held.enter_async_context(pool.acquire())
    assert checked_out(pool) == 0
    before = await app_backends(pg)
    assert len(before) == pool_size and set(before.values()) == {"idle"}, before

    restarting = now()
    await asyncio.to_thread(pg.restart, "fast")
    back_at = now()
    report("pg_ctl restart -m fast took", back_at - restarting)

    listed, recovery = await timed(app.request("threads.list", {}))
    report("restart while idle: the first request answered after", recovery)
    assert listed.status_code == 200, listed.text
    assert recovery < RECOVERY_SECONDS
    assert [t["id"] for t in listed.json()["data"]] == [thread_id]

    # Everything else works at once too: concurrent requests, readiness, a new reply.
    responses = await asyncio.gather(*(app.request("threads.list", {}) for _ in range(pool_size)))
    assert [r.status_code for r in responses] == [200] * pool_size
    assert (await app.http.get("/readyz")).status_code == 200
    again = await app.stream(
        "threads.add_user_message", {"thread_id": thread_id, "input": user_input("After")}
    )
    assert done_items(again, "assistant_message"), again
    after = await app_backends(pg)
    assert after and not set(after) & set(before), (before, after)  # all new connections


# --- 3. requests keep coming while PostgreSQL restarts -------------------------------------------


async def test_requests_during_a_restart(pg: PgInstance, served: Any) -> None:
    """Clients keep asking while ``pg_ctl restart -m fast`` runs (shutting down, gone,
    starting up): each answer is a 200 or a well-formed 503, none takes longer than the
    configured timeouts, and every request sent after the restart returns succeeds."""
    model = GatedModel()
    model.gate.set()
    app: Served = await served(model, db_pool_size=3)
    events = await app.stream("threads.create", {"input": user_input("Busy times")})
    thread_id = of_type(events, "thread.created")[0]["thread"]["id"]
    restarted = asyncio.Event()
    outcomes: list[tuple[bool, int, float]] = []  # (sent after the restart, status, seconds)

    async def client(kind: str) -> None:
        while True:
            after = restarted.is_set()
            if kind == "list":
                call = app.request("threads.list", {})
            elif kind == "items":
                call = app.request("items.list", {"thread_id": thread_id})
            else:
                call = app.http.get("/readyz")
            response, took = await timed(call)
            if response.status_code == 503 and kind != "ready":
                assert_unavailable(response)
            else:
                assert response.status_code in (200, 503), response.text
            outcomes.append((after, response.status_code, took))
            if after:
                return
            await asyncio.sleep(0.005)

    clients = [asyncio.create_task(client(kind)) for kind in ("list", "items", "ready") * 2]
    try:
        await until(value(lambda: len(outcomes) >= 12), "requests before the restart")
        await asyncio.to_thread(pg.restart, "fast")
        restarted.set()
        await asyncio.wait_for(asyncio.gather(*clients), DEADLINE)
    finally:
        for task in clients:
            task.cancel()
    during = [o for o in outcomes if not o[0]]
    after = [o for o in outcomes if o[0]]
    report(
        f"during the restart: {len(during)} requests, "
        f"{sum(1 for o in during if o[1] == 503)} were 503s; the slowest",
        max(o[2] for o in during),
    )
    report("after the restart: the slowest first request", max(o[2] for o in after))
    assert any(o[1] == 503 for o in during), "no request met the restart"
    assert [o[1] for o in after] == [200] * len(clients), after
    assert max(o[2] for o in after) < RECOVERY_SECONDS
    await until(value(lambda: checked_out(app.pg.pool) == 0), "every connection back in the pool")


# --- 4. the moment between PostgreSQL's goodbye and the end of the socket ------------------------


async def test_checkout_between_the_fatal_message_and_the_end_of_file(
    pg: PgInstance, restart_settings: Settings
) -> None:
    """A stopping server sends each idle connection ``FATAL: terminating connection due to
    administrator command``, then closes it. asyncpg reads the two in different event-loop
    iterations: the message (unexpected while idle) leaves its protocol in an error state, and
    only the end of file marks the connection closed. A request that checks the connection
    out in between passes the checkout check and must still get a 503, not a 500.

    The window is made exact rather than raced (test 3 meets it by chance under load): the
    loop is blocked while the server stops, so both wait in the socket; one loop iteration
    then reads the message, and in the next this task runs before the end of file is read."""
    pool = await open_pool(restart_settings.database_url or "", restart_settings)
    store = PostgresStore(pool)
    try:
        async with store.connection() as conn:  # one idle pooled connection
            assert await conn.fetchval("SELECT 1") == 1
        pg.stop("fast")  # blocking on purpose: the loop reads nothing until it returns
        await asyncio.sleep(0)  # this iteration reads the FATAL message
        await asyncio.sleep(0)  # this one runs us before it reads the end of file
        with pytest.raises(ServiceUnavailableError):
            async with store.connection() as conn:
                await conn.fetchval("SELECT 1")
        # And the next attempt, once the socket's end has been read, is a plain 503 as well.
        with pytest.raises(ServiceUnavailableError):
            async with store.connection() as conn:
                await conn.fetchval("SELECT 1")
    finally:
        await pool.close()
    await asyncio.to_thread(pg.start)
    pool = await open_pool(restart_settings.database_url or "", restart_settings)
    try:
        async with PostgresStore(pool).connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await pool.close()
