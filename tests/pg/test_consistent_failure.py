"""A stream never reports an error for a reply it stored, nor success for one it did not: the
client's view and the thread agree, while PostgreSQL is frozen (SIGSTOP on every process of a
private server, tests/harness/pgfreeze.py: a hung host, a stalled disk) and after it resumes.

What made them disagree: a statement the frozen server had received (the reply's ``INSERT``,
already prepared on the connection, so sent in one write) outlived asyncpg's command timeout,
the stream said "error, retry", and the server committed it the moment it resumed. And a step
after the reply was saved (the thread's title) failing turned the whole stream into an error.

* The database is back within ``SAVE_RETRY_SECONDS``: the write is tried again, the reply is
  stored once and the stream ends as a success.
* It is not: the stream ends in an error, and once the database answers, the app fences the
  backend it gave up on and takes back the reply if it landed.
* A failure after the complete reply is logged, not sent: the reply stands on both sides.

Every wait polls a condition (the app has closed its connection to the frozen backend; that
backend is gone once resumed) under a generous deadline; nothing depends on a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import httpx
import pytest
from agents.testing import ModelStep, ScriptedModel, assistant_message

from app.http.runtime import Runtime
from app.main import create_app
from app.settings import Settings
from tests.conftest import TABLES
from tests.harness.chatkit_client import ChatKitClient, done_items, of_type, user_input
from tests.harness.pg import migrate
from tests.harness.pgfreeze import frozen
from tests.harness.pginstance import PgInstance, private_postgres
from tests.http.test_faults import DEADLINE, GatedModel, now, report, stream_error, until, value

DATABASE = "ckpg_consistent"
APP_NAME = "chatkit-pg-consistent"


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PgInstance]:
    with private_postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
async def private_url(private_pg: PgInstance) -> str:
    conn = await asyncpg.connect(private_pg.dsn())
    try:
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    url = private_pg.url(DATABASE)
    await asyncio.to_thread(migrate, url)
    return url


@pytest.fixture
async def pg(private_pg: PgInstance, private_url: str) -> AsyncIterator[PgInstance]:
    yield private_pg
    conn = await asyncpg.connect(private_pg.dsn(DATABASE))
    try:
        await conn.execute(f"TRUNCATE {TABLES} CASCADE")
    finally:
        await conn.close()


async def fetch(pg: PgInstance, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg.dsn(DATABASE), timeout=DEADLINE)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


async def app_backends(pg: PgInstance) -> set[int]:
    rows = await fetch(
        pg,
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
        DATABASE,
        APP_NAME,
    )
    return {row["pid"] for row in rows}


async def stored_replies(pg: PgInstance, thread_id: str) -> list[str]:
    rows = await fetch(
        pg,
        "SELECT id FROM chatkit_items WHERE thread_id = $1 AND type = 'assistant_message' "
        "ORDER BY created_at, id",
        thread_id,
    )
    return [row["id"] for row in rows]


@pytest.fixture
async def start(pg: PgInstance, private_url: str, app_settings: Settings) -> AsyncIterator[Any]:
    """``await start(model, **settings)``: an app on the private server with one pooled
    connection (so the reply's statement is already prepared on it: one write)."""
    async with AsyncExitStack() as stack:

        async def factory(model: Any, **overrides: Any) -> ChatKitClient:
            settings = app_settings.model_copy(
                update={
                    "database_url": private_url,
                    "db_application_name": APP_NAME,
                    "db_pool_size": 1,
                    "db_max_overflow": 0,
                    "db_statement_timeout_ms": 500,  # asyncpg gives up after 1 s
                    "db_connect_timeout": 0.5,
                    "stream_lease_seconds": 600.0,  # no lease renewal during a test
                    "shutdown_grace_seconds": 2.0,
                    **overrides,
                }
            )
            app = create_app(settings, model=model)
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            http = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60)
            )
            return ChatKitClient(app, http, settings)

        yield factory


async def second_turn_saved_while_frozen(
    pg: PgInstance, client: ChatKitClient, model: GatedModel, *, resume: str
) -> tuple[str, list[dict[str, Any]], set[int]]:
    """Turn 1 completes; turn 2's reply is saved while the server is frozen. ``resume``: "at
    once" (as soon as the app has given up on the statement) or "after" (once the stream has
    ended). Returns the thread, turn 2's events and the app's backends before the freeze."""
    model.gate.set()
    thread_id, first = await client.create_thread("One")
    assert done_items(first, "assistant_message"), first
    model.gate.clear()
    runtime: Runtime = client.app.state.runtime
    turn = asyncio.create_task(
        client.stream(
            "threads.add_user_message", {"thread_id": thread_id, "input": user_input("Two")}
        )
    )
    await until(value(lambda: model.waiting == 1), "the model to think")
    before = await app_backends(pg)
    assert runtime.pool.size() == 1, before
    with frozen(pg):
        model.gate.set()  # the reply is done: its save goes to the frozen server
        await until(value(lambda: runtime.pool.size() == 0), "the app to give up the statement")
        if resume == "after":
            events = await asyncio.wait_for(turn, DEADLINE)
        resumed_at = now()
    if resume == "at once":
        events = await asyncio.wait_for(turn, DEADLINE)
        report("frozen while a reply is saved: stream ended after the resume", now() - resumed_at)
    return thread_id, events, before


async def settled(pg: PgInstance, client: ChatKitClient, before: set[int]) -> None:
    """The backend the app gave up on has ended (whatever it had been sent, it has done), and
    the app's background work is over."""

    async def gone() -> bool:
        return not (await app_backends(pg)) & before

    await until(gone, "the abandoned backend to end")
    runtime: Runtime = client.app.state.runtime
    await until(value(lambda: len(runtime.tasks) == 0), "background tasks to end")


async def test_a_reply_saved_while_frozen_is_stored_once_and_reported_done(
    pg: PgInstance, start: Any
) -> None:
    model = GatedModel(before=("Let me ",), after=("see.",))
    client = await start(model, save_retry_seconds=DEADLINE)
    thread_id, events, before = await second_turn_saved_while_frozen(
        pg, client, model, resume="at once"
    )
    assert events and events[-1]["type"] != "error", events[-3:]
    seen = [item["id"] for item in done_items(events, "assistant_message")]
    assert len(seen) == 1, events
    await settled(pg, client, before)
    stored = await stored_replies(pg, thread_id)
    assert stored[1:] == seen  # turn 1's reply, then this one, once


async def test_a_reply_reported_failed_is_not_left_in_the_thread(
    pg: PgInstance, start: Any
) -> None:
    """Frozen for longer than the retries: the stream ends in an error while the server is
    still frozen; once it resumes, the reply it may have committed is taken back."""
    model = GatedModel(before=("Let me ",), after=("see.",))
    client = await start(model, save_retry_seconds=0.5)
    thread_id, events, before = await second_turn_saved_while_frozen(
        pg, client, model, resume="after"
    )
    stream_error(events)
    assert not done_items(events, "assistant_message")
    resumed_at = now()
    await settled(pg, client, before)
    report(
        "frozen past the retries: reply checked and taken back after the resume", now() - resumed_at
    )
    stored = await stored_replies(pg, thread_id)
    assert len(stored) == 1, stored  # turn 1's reply only


async def test_a_failure_after_the_reply_is_saved_does_not_fail_the_stream(
    pg: PgInstance, start: Any
) -> None:
    """The reply is saved; the thread's title is then saved to a frozen server and fails: the
    stream still ends as the success it was (no title on either side)."""
    titling, title_gate = asyncio.Event(), asyncio.Event()

    async def gated_title(call: Any) -> Any:
        titling.set()
        await title_gate.wait()
        return [assistant_message("A title")]

    model = ScriptedModel([[assistant_message("The answer.")], ModelStep.respond(gated_title)])
    client = await start(model, thread_titles="model", save_retry_seconds=0.0)
    runtime: Runtime = client.app.state.runtime
    turn = asyncio.create_task(client.stream("threads.create", {"input": user_input("Q")}))
    await asyncio.wait_for(titling.wait(), DEADLINE)
    before = await app_backends(pg)
    with frozen(pg):
        title_gate.set()
        events = await asyncio.wait_for(turn, DEADLINE)
    assert events[-1]["type"] != "error", events[-3:]
    seen = [item["id"] for item in done_items(events, "assistant_message")]
    assert len(seen) == 1 and not of_type(events, "thread.updated"), events
    await settled(pg, client, before)
    thread_id = of_type(events, "thread.created")[0]["thread"]["id"]
    assert await stored_replies(pg, thread_id) == seen
    assert runtime.pool.in_use == 0
