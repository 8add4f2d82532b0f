"""The run log's pool of its own (RUN_LOG_POOL_SIZE, app.pg.runlog): a resumable reply's
batches go on being logged while every connection of the app's pool is taken (as hundreds of
streams and their requests take them under load), instead of queueing behind the requests.

The app runs under uvicorn on loopback against the test's PostgreSQL, with a scripted model
holding its reply after the first delta. The test takes every connection of the app's pool,
lets the reply go on, and reads the log through a connection of its own: the events after the
first delta are there while the app's pool is still all taken. Sharing that pool, the appends
could not be written until the test gave the connections back (they wait up to
DB_POOL_TIMEOUT, longer than the test looks)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
from agents.testing import ScriptedModel

from app.http.runtime import Runtime
from app.main import create_app
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness.chatkit_client import token_for, user_input
from tests.harness.loopback import serve
from tests.harness.runs import RESUMABLE, held_reply

DELTA = '"assistant_message.content_part.text_delta"'
LOOK_SECONDS = 10.0  # how long the test looks for the logged events; DB_POOL_TIMEOUT is longer


async def logged_deltas(store: PostgresStore, run_id: str) -> list[str]:
    """The run's logged text deltas, in order, read past the app's pools."""
    async with store.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT data FROM chatkit_run_events WHERE run_id = $1 ORDER BY seq", run_id
        )
    events = [json.loads(row["data"].removeprefix("data: ")) for row in rows]
    return [e["update"]["delta"] for e in events if e.get("update", {}).get("delta") is not None]


async def test_a_replys_events_are_logged_while_the_apps_pool_is_all_taken(
    app_settings: Settings, store: PostgresStore
) -> None:
    settings = app_settings.model_copy(
        update={"db_pool_size": 2, "db_max_overflow": 0, "db_pool_timeout": 60.0}
    )
    assert settings.run_log_pool_size > 0  # the default
    gate = asyncio.Event()
    chunks = ["One ", "two ", "three ", "four"]
    app = create_app(settings, model=ScriptedModel([held_reply(chunks, gate)]))
    async with serve(app) as base:
        runtime: Runtime = app.state.runtime
        headers = {"Authorization": f"Bearer {token_for('alice', settings)}", **RESUMABLE}
        body = {"type": "threads.create", "params": {"input": user_input("Count to four")}}
        async with (
            httpx.AsyncClient(base_url=base, timeout=90) as http,
            http.stream("POST", "/chatkit", json=body, headers=headers) as response,
        ):
            assert response.status_code == 200
            run_id = response.headers["x-chatkit-run"]
            lines = response.aiter_lines()
            async for line in lines:
                if DELTA in line:
                    break
            async with contextlib.AsyncExitStack() as taken:
                for _ in range(runtime.pool.max_size):
                    await taken.enter_async_context(runtime.pool.acquire())
                assert runtime.pool.in_use == runtime.pool.max_size
                gate.set()  # the rest of the reply: three deltas, then its end
                deadline = time.monotonic() + LOOK_SECONDS
                while (logged := await logged_deltas(store, run_id)) != chunks:
                    assert time.monotonic() < deadline, f"logged only {logged!r}"
                    await asyncio.sleep(0.05)
                assert runtime.pool.in_use == runtime.pool.max_size  # still all taken
            # The app's pool back, the reply ends (its item is stored through that pool).
            rest = [line async for line in lines]
        assert sum(DELTA in line for line in rest) == len(chunks) - 1
