"""Database faults, made on purpose: the app talks to the real PostgreSQL through a TCP proxy
(tests/harness/tcpproxy.py) that the test can close, reopen, cut and stall.

What must hold whatever breaks: the app starts without its database; a request that needs the
database while it is away gets a 503 JSON answer with ``Retry-After`` (or, once a stream has
started, a ChatKit ``error`` event), never a 500, a traceback or a hang past the configured
timeouts; and once the database answers again, the very next request succeeds, with no
restart. Locks and timeouts (``DB_LOCK_TIMEOUT_MS``, ``DB_STATEMENT_TIMEOUT_MS``) fail one
request as a 503 and leave its pooled connection usable. A stream holds no pooled connection
while it waits on the model.

Timings are measured with the event loop's clock and printed (run with ``-s`` to see them);
bounds are generous next to what is measured, and every wait polls against a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import httpx
import pytest

from app.http.runtime import Runtime
from app.main import create_app
from app.pg.pool import ConnectionPool
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness.chatkit_client import (
    MakeClient,
    done_items,
    of_type,
    token_for,
    user_input,
)
from tests.harness.faults import (
    DEADLINE,
    RECOVERY_SECONDS,
    SLACK_SECONDS,
    GatedModel,
    all_seen_closed,
    assert_unavailable,
    checked_out,
    now,
    pooled_pid,
    report,
    sse_event,
    stream_error,
    until,
    value,
)
from tests.harness.loopback import serve
from tests.harness.pg import PgServer
from tests.harness.tcpproxy import TcpProxy

# --- fixtures ----------------------------------------------------------------------------------

PROXIED_APP = "chatkit-pg-proxied"


@pytest.fixture
def app_settings(app_settings: Settings) -> Settings:
    """conftest's, with an application_name of its own: the proxied apps' backends are told
    apart from every other connection by it (a Unix-socket server reports no client ports)."""
    return app_settings.model_copy(update={"db_application_name": PROXIED_APP})


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection (no proxy) for the test's own locks and checks."""
    conn = await asyncpg.connect(PgServer.dsn(database_url))
    yield conn
    await conn.close()


async def app_backends(admin: asyncpg.Connection, proxy: TcpProxy) -> list[asyncpg.Record]:
    """The server processes serving the proxied app's pooled connections."""
    rows: list[asyncpg.Record] = await admin.fetch(
        "SELECT pid, state, wait_event_type FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = $1",
        PROXIED_APP,
    )
    return rows


# --- 1. the database is away when the app starts ---------------------------------------------


@pytest.mark.parametrize("rate_limit", [100_000, 0], ids=["limiter", "no-limiter"])
async def test_database_down_at_start_up(
    proxy: TcpProxy, via_proxy: str, make_client: MakeClient, rate_limit: int
) -> None:
    """With the limiter on, its upsert is the first statement of every request; with it off,
    the store's own statements (and the stream lease) meet the outage."""
    proxy.refuse()
    # The lifespan completes without the database.
    client = await make_client(database_url=via_proxy, rate_limit_per_minute=rate_limit)
    http = client.http

    assert (await http.get("/healthz")).status_code == 200
    ready = await http.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "database": "unreachable"}

    for type_, params in (
        ("threads.list", {}),
        ("threads.create", {"input": user_input("Hello?")}),
    ):
        started = now()
        response = await client.request(type_, params)
        assert_unavailable(response)
        assert now() - started < SLACK_SECONDS  # a refused connection fails at once
    assert proxy.accepted == 0

    await proxy.accept()
    started = now()
    listed = await client.request("threads.list", {})  # the very first request after
    recovery = now() - started
    report("database down at start-up: first request after it is back", recovery)
    assert listed.status_code == 200, listed.text
    assert listed.json()["data"] == []
    assert recovery < RECOVERY_SECONDS
    assert (await http.get("/readyz")).status_code == 200
    _, events = await client.create_thread("Hello again")
    assert done_items(events, "assistant_message"), events


async def test_database_hung_at_start_up(
    proxy: TcpProxy, via_proxy: str, make_client: MakeClient
) -> None:
    """A network that swallows packets: connecting fails after DB_CONNECT_TIMEOUT, as a 503."""
    connect_timeout = 0.5
    proxy.stall()
    try:
        client = await make_client(database_url=via_proxy, db_connect_timeout=connect_timeout)
        started = now()
        response = await client.request("threads.list", {})
        took = now() - started
        report("hung network at start-up: 503 after", took)
        assert_unavailable(response)
        assert connect_timeout * 0.8 <= took < connect_timeout + SLACK_SECONDS
        assert (await client.http.get("/readyz")).status_code == 503
    finally:
        proxy.resume()
    started = now()
    listed = await client.request("threads.list", {})
    recovery = now() - started
    report("hung network at start-up: first request after it is back", recovery)
    assert listed.status_code == 200, listed.text
    assert recovery < RECOVERY_SECONDS


# --- 2. connections cut under the app ---------------------------------------------------------


async def test_terminated_idle_connections_are_renewed(
    proxy: TcpProxy, via_proxy: str, make_client: MakeClient, admin: asyncpg.Connection
) -> None:
    client = await make_client(database_url=via_proxy, db_pool_size=3)
    pool: ConnectionPool = client.app.state.runtime.pool
    thread_id, _ = await client.create_thread("Before the terminate")
    # Three connections idle in the pool: the whole pool has to be renewed, not just one.
    async with AsyncExitStack() as held:
        for _ in range(3):
            await held.enter_async_context(pool.acquire())
        assert checked_out(pool) == 3
    assert checked_out(pool) == 0
    idle = await app_backends(admin, proxy)
    assert len(idle) == 3 and all(b["state"] == "idle" for b in idle), idle

    killed = await admin.fetch(
        "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS t(pid)",
        [b["pid"] for b in idle],
    )
    assert all(row[0] for row in killed)
    await until(value(lambda: proxy.open_connections == 0), "the proxy to see them close")
    await until(value(lambda: all_seen_closed(pool)), "the app's driver to see them close")

    started = now()
    listed = await client.request("threads.list", {})  # the very next request
    took = now() - started
    report("after pg_terminate_backend: the next request", took)
    assert listed.status_code == 200, listed.text
    assert [t["id"] for t in listed.json()["data"]] == [thread_id]
    assert took < RECOVERY_SECONDS
    events = await client.send(thread_id, "After the terminate")
    assert done_items(events, "assistant_message"), events
    fresh = await app_backends(admin, proxy)
    assert fresh and not {b["pid"] for b in fresh} & {b["pid"] for b in idle}


async def test_connection_cut_during_a_slow_statement(
    proxy: TcpProxy, via_proxy: str, make_client: MakeClient, admin: asyncpg.Connection
) -> None:
    """A request waits on a row lock; the network is cut under it: 503 at once, not after
    the lock timeout; the next request succeeds."""
    lock_timeout_ms = 8000
    client = await make_client(database_url=via_proxy, db_lock_timeout_ms=lock_timeout_ms)
    thread_id, _ = await client.create_thread("Rename me")

    async with admin.transaction():
        await admin.execute("SELECT 1 FROM chatkit_threads WHERE id = $1 FOR UPDATE", thread_id)
        update = asyncio.create_task(
            client.request("threads.update", {"thread_id": thread_id, "title": "New title"})
        )

        async def waiting_on_the_lock() -> bool:
            return any(b["wait_event_type"] == "Lock" for b in await app_backends(admin, proxy))

        await until(waiting_on_the_lock, "the update to wait on the row lock")
        cut_at = now()
        assert await proxy.cut() >= 1
        response = await asyncio.wait_for(update, lock_timeout_ms / 1000)
        took = now() - cut_at
        report("connection cut during a lock wait: 503 after", took)
        assert_unavailable(response)
        assert took < SLACK_SECONDS

        # Still inside the test's lock: a request that does not need it works at once.
        started = now()
        listed = await client.request("threads.list", {})
        recovery = now() - started
        report("connection cut during a lock wait: the next request", recovery)
        assert listed.status_code == 200, listed.text
        assert recovery < RECOVERY_SECONDS
    renamed = await client.call("threads.update", {"thread_id": thread_id, "title": "Renamed"})
    assert renamed["title"] == "Renamed"
    assert checked_out(client.app.state.runtime.pool) == 0


@pytest.mark.parametrize("retry_seconds", [30.0, 0.0], ids=["retried", "not-retried"])
async def test_connection_cut_while_a_stream_saves(
    proxy: TcpProxy,
    via_proxy: str,
    make_client: MakeClient,
    store: PostgresStore,
    retry_seconds: float,
) -> None:
    """The network hangs as the reply is saved, then the connections are reset: whether the
    statement reached the server is unknown (app.chat.settle). Retried (the default), the save
    goes again on a new connection: the reply is stored once and the stream ends as the
    success it is. Not retried (``SAVE_RETRY_SECONDS=0``), the stream ends with a ChatKit
    error event and the reply is not in the thread. Either way the next request succeeds."""
    model = GatedModel()
    client = await make_client(model, database_url=via_proxy, save_retry_seconds=retry_seconds)
    pool: ConnectionPool = client.app.state.runtime.pool
    stream = asyncio.create_task(client.stream("threads.create", {"input": user_input("Hi")}))
    await until(value(lambda: model.waiting == 1), "the model to think")
    # The reply's first read of the thread may still be finishing as the model starts.
    await until(value(lambda: checked_out(pool) == 0), "no connection held while it thinks")

    proxy.stall()
    try:
        model.gate.set()  # the reply is done: the SDK saves it, through the hung network
        await until(value(lambda: checked_out(pool) == 1), "the save to hang")
        await asyncio.sleep(0.2)  # it stays hung (nothing answers)
        assert not stream.done() and checked_out(pool) == 1
        cut_at = now()
        await proxy.cut()
    finally:
        proxy.resume()
    events = await asyncio.wait_for(stream, DEADLINE)
    took = now() - cut_at
    report(
        f"connection cut while a reply is saved ({'retried' if retry_seconds else 'not retried'}): stream ended after",
        took,
    )
    assert took < SLACK_SECONDS
    if retry_seconds:
        assert events[-1]["type"] != "error", events[-3:]
        seen = [item["id"] for item in done_items(events, "assistant_message")]
        assert len(seen) == 1, events
    else:
        stream_error(events)
        seen = []
        assert not done_items(events, "assistant_message")

    started = now()
    listed = await client.request("threads.list", {})
    recovery = now() - started
    report("connection cut while a reply is saved: the next request", recovery)
    assert listed.status_code == 200, listed.text
    assert recovery < RECOVERY_SECONDS
    runtime: Runtime = client.app.state.runtime
    await until(value(lambda: len(runtime.tasks) == 0), "background checks to end")
    thread_id = of_type(events, "thread.created")[0]["thread"]["id"]
    items = (await store.load_thread_items(thread_id, None, 10, "asc", {"user_id": "alice"})).data
    assert [i.type for i in items] == ["user_message"] + ["assistant_message"] * len(seen)
    assert [i.id for i in items if i.type == "assistant_message"] == seen
    await until(value(lambda: checked_out(pool) == 0), "every connection back in the pool")


async def test_hung_network_fails_within_the_timeouts(
    proxy: TcpProxy, via_proxy: str, make_client: MakeClient
) -> None:
    """Packets vanish mid-session (no reset, no answer): the request must still end, as a 503,
    within the configured timeouts. The server never sees the statement, so its
    statement_timeout cannot fire: asyncpg's command timeout, which app/pg/engine.py derives as twice
    DB_STATEMENT_TIMEOUT_MS, is the only guard. Allowed: that, plus the 2 s SQLAlchemy gives
    the dead connection to close when it is invalidated, plus slack."""
    statement_timeout = 0.5
    client = await make_client(
        database_url=via_proxy,
        db_statement_timeout_ms=int(statement_timeout * 1000),
        db_connect_timeout=1.0,
    )
    await client.call("threads.list", {})  # one idle pooled connection
    bound = 2 * statement_timeout + 2.0 + SLACK_SECONDS
    proxy.stall()
    try:
        started = now()
        try:
            response = await asyncio.wait_for(client.request("threads.list", {}), bound + 1)
        except TimeoutError:
            pytest.fail(
                f"a request on a hung connection was still waiting after {bound + 1:.0f} s "
                f"(DB_STATEMENT_TIMEOUT_MS={statement_timeout * 1000:.0f})"
            )
        took = now() - started
        report("hung network mid-session: 503 after", took)
        assert_unavailable(response)
        assert took < bound
    finally:
        proxy.resume()
    started = now()
    listed = await client.request("threads.list", {})
    assert listed.status_code == 200, listed.text
    assert now() - started < RECOVERY_SECONDS


# --- 3. PostgreSQL restarts while a reply streams ---------------------------------------------


async def test_restart_during_a_stream(
    proxy: TcpProxy,
    via_proxy: str,
    app_settings: Settings,
    store: PostgresStore,
    admin: asyncpg.Connection,
) -> None:
    """Through a real uvicorn: the restart cuts every connection and refuses new ones for
    ~1.5 s while the model is still writing; its reply then has to be saved."""
    down_seconds = 1.5
    model = GatedModel()
    settings = app_settings.model_copy(update={"database_url": via_proxy})
    app = create_app(settings, model=model)
    headers = {"Authorization": f"Bearer {token_for('alice', settings)}"}
    body = {"type": "threads.create", "params": {"input": user_input("Tell me everything")}}
    events: list[dict[str, Any]] = []
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        runtime: Runtime = app.state.runtime
        async with http.stream("POST", "/chatkit", json=body, headers=headers) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            while not of_type(events, "thread.item.updated"):  # the first words arrived
                event = await asyncio.wait_for(sse_event(lines), DEADLINE)
                assert event is not None, events
                events.append(event)
            await until(value(lambda: model.waiting == 1), "the model to think")

            proxy.refuse()  # PostgreSQL stops: connections reset, new ones refused
            assert await proxy.cut() >= 1
            cut_at = now()
            model.gate.set()  # the model finishes its reply meanwhile
            async with asyncio.timeout(DEADLINE):
                while (event := await sse_event(lines)) is not None:
                    events.append(event)
            ended = now() - cut_at
        report("restart during a stream: the stream ended after", ended)
        assert ended < SLACK_SECONDS
        stream_error(events)
        assert not done_items(events, "assistant_message")

        # While it is down, requests are 503s, quickly.
        listed = await http.post(
            "/chatkit", json={"type": "threads.list", "params": {}}, headers=headers
        )
        assert_unavailable(listed)

        await asyncio.sleep(max(0.0, cut_at + down_seconds - now()))  # the restart itself
        await proxy.accept()
        started = now()
        listed = await http.post(
            "/chatkit", json={"type": "threads.list", "params": {}}, headers=headers
        )
        recovery = now() - started
        report("restart during a stream: the first request after it", recovery)
        assert listed.status_code == 200, listed.text
        assert recovery < RECOVERY_SECONDS
        assert (await http.get("/readyz")).status_code == 200
        await until(value(lambda: len(runtime.tasks) == 0), "background tasks to end")
        assert checked_out(runtime.pool) == 0

    # The acknowledged user message is stored; the reply that could not be saved is not;
    # nothing half-written.
    thread_id = of_type(events, "thread.created")[0]["thread"]["id"]
    acknowledged = done_items(events, "user_message")
    assert len(acknowledged) == 1
    items = (await store.load_thread_items(thread_id, None, 10, "asc", {"user_id": "alice"})).data
    assert [(i.type, i.id) for i in items] == [("user_message", acknowledged[0]["id"])]
    orphans = await admin.fetchval(
        "SELECT count(*) FROM chatkit_items i LEFT JOIN chatkit_threads t "
        "ON t.user_id = i.user_id AND t.id = i.thread_id WHERE t.id IS NULL"
    )
    assert orphans == 0


async def test_thread_answers_again_right_after_a_restart(
    proxy: TcpProxy, via_proxy: str, make_client: MakeClient, admin: asyncpg.Connection
) -> None:
    """The user retries in the same conversation once the database is back: the reply that
    failed must not keep the thread claimed (ChatKit offered the retry: allow_retry)."""
    model = GatedModel()
    client = await make_client(model, database_url=via_proxy, thread_busy_wait_seconds=2.0)
    stream = asyncio.create_task(client.stream("threads.create", {"input": user_input("One")}))
    await until(value(lambda: model.waiting == 1), "the model to think")
    proxy.refuse()
    await proxy.cut()
    model.gate.set()
    first = await asyncio.wait_for(stream, DEADLINE)
    stream_error(first)
    thread_id = of_type(first, "thread.created")[0]["thread"]["id"]
    await asyncio.sleep(0.5)  # a short outage
    await proxy.accept()

    started = now()
    again = await client.send(thread_id, "Are you there?")
    took = now() - started
    report("retry in the same thread after a restart: answered after", took)
    leases = await admin.fetchval("SELECT count(*) FROM chatkit_stream_leases")
    assert done_items(again, "assistant_message"), (
        f"no reply ({[e['type'] for e in again]}); stream leases left: {leases}"
    )
    assert took < RECOVERY_SECONDS


# --- 4. more streams than pooled connections ----------------------------------------------


async def test_streams_hold_no_connection_while_the_model_thinks(
    make_client: MakeClient,
) -> None:
    streams = 8
    model = GatedModel()
    client = await make_client(
        model, db_pool_size=2, db_max_overflow=0, db_pool_timeout=5.0, max_streams_per_user=0
    )
    pool: ConnectionPool = client.app.state.runtime.pool
    tasks = [
        asyncio.create_task(client.create_thread(f"Question {i}", user=f"user{i % 4}"))
        for i in range(streams)
    ]
    await until(value(lambda: model.waiting == streams), f"{streams} streams to wait on the model")

    # The real proof: all of them are streaming, and not one pooled connection is out.
    await until(value(lambda: checked_out(pool) == 0), "the pool to be free")
    assert pool.size() <= 2
    slowest = 0.0
    for _ in range(5):
        started = now()
        listed = await client.request("threads.list", {}, user="zoe")
        slowest = max(slowest, now() - started)
        assert listed.status_code == 200, listed.text
        assert checked_out(pool) == 0 and model.waiting == streams
    report(f"threads.list while {streams} streams wait on the model (slowest of 5)", slowest)
    assert slowest < 1.0
    assert not any(t.done() for t in tasks)

    model.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
    for _, events in results:
        assert done_items(events, "assistant_message"), events
    assert checked_out(pool) == 0


# --- 5. lock and statement timeouts -------------------------------------------------------------


async def test_lock_timeout_is_a_503_and_the_connection_lives_on(
    make_client: MakeClient, admin: asyncpg.Connection
) -> None:
    lock_timeout = 0.2
    client = await make_client(
        db_pool_size=1, db_max_overflow=0, db_lock_timeout_ms=int(lock_timeout * 1000)
    )
    pool: ConnectionPool = client.app.state.runtime.pool
    thread_id, _ = await client.create_thread("Locked soon")
    pid = await pooled_pid(pool)

    async def times_out(type_: str, params: dict[str, Any]) -> float:
        started = now()
        response = await client.request(type_, params)
        took = now() - started
        assert_unavailable(response)
        assert lock_timeout * 0.9 <= took < lock_timeout + SLACK_SECONDS, took
        return took

    # A row lock on the thread: updating or deleting it waits, then gives up.
    async with admin.transaction():
        await admin.execute("SELECT 1 FROM chatkit_threads WHERE id = $1 FOR UPDATE", thread_id)
        took = await times_out("threads.update", {"thread_id": thread_id, "title": "New"})
        report("row lock: threads.update 503 after", took)
        await times_out("threads.delete", {"thread_id": thread_id})
        # The connection that timed out serves the next request at once, lock still held.
        assert (await client.request("threads.list", {})).status_code == 200
        assert await pooled_pid(pool) == pid

    # The limiter's per-request upsert waits on its row like any statement.
    async with admin.transaction():
        await admin.execute("SELECT 1 FROM chatkit_rate_limits WHERE user_id = 'alice' FOR UPDATE")
        await times_out("threads.list", {})
        assert (await client.request("threads.list", {}, user="bob")).status_code == 200

    # The stream lease's advisory lock: the stream is refused before it starts.
    async with admin.transaction():
        await admin.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('chatkit-pg.leases:' || $1, 0))",
            "alice",
        )
        await times_out(
            "threads.add_user_message", {"thread_id": thread_id, "input": user_input("x")}
        )

    renamed = await client.call("threads.update", {"thread_id": thread_id, "title": "Renamed"})
    assert renamed["title"] == "Renamed"
    events = await client.send(thread_id, "Still there?")
    assert done_items(events, "assistant_message"), events
    assert await pooled_pid(pool) == pid  # the one pooled connection was never replaced


async def test_statement_timeout_is_a_503_and_the_connection_lives_on(
    make_client: MakeClient, admin: asyncpg.Connection
) -> None:
    statement_timeout = 0.3
    client = await make_client(
        db_pool_size=1,
        db_max_overflow=0,
        db_statement_timeout_ms=int(statement_timeout * 1000),
        db_lock_timeout_ms=0,  # only the statement timeout can end the wait
    )
    pool: ConnectionPool = client.app.state.runtime.pool
    thread_id, _ = await client.create_thread("Slow soon")
    pid = await pooled_pid(pool)

    async with admin.transaction():
        await admin.execute("SELECT 1 FROM chatkit_threads WHERE id = $1 FOR UPDATE", thread_id)
        started = now()
        response = await client.request("threads.update", {"thread_id": thread_id, "title": "X"})
        took = now() - started
        report("statement timeout: threads.update 503 after", took)
        assert_unavailable(response)
        assert statement_timeout * 0.9 <= took < statement_timeout + SLACK_SECONDS
        assert (await client.request("threads.list", {})).status_code == 200
        assert await pooled_pid(pool) == pid

    renamed = await client.call("threads.update", {"thread_id": thread_id, "title": "Renamed"})
    assert renamed["title"] == "Renamed"
    assert await pooled_pid(pool) == pid
