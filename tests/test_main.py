"""The app's lifespan (app.main): what a started app leaves to the garbage collector.

A full collection stops the event loop for as long as it walks the heap, and every stream whose
next event falls due meanwhile sends it that much late. The app's own objects (modules,
schemas, the agent, the pool) live as long as the process: once it has started they are frozen,
out of every collection's walk, and a reply's objects are walked (and freed) as before."""

from __future__ import annotations

import asyncio
import gc

import httpx
from agents.testing import ScriptedModel

from app.http.runtime import Runtime
from app.main import create_app
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness.chatkit_client import token_for, user_input
from tests.harness.loopback import serve
from tests.harness.runs import held_reply

DELTA = '"assistant_message.content_part.text_delta"'


def walked() -> set[int]:
    """The ids of the objects a full collection walks (frozen ones are not among them)."""
    return {id(o) for o in gc.get_objects()}


async def test_a_full_collection_walks_a_replys_objects_not_the_started_apps(
    app_settings: Settings, store: PostgresStore
) -> None:
    gate = asyncio.Event()
    app = create_app(app_settings, model=ScriptedModel([held_reply(["One ", "two"], gate)]))
    async with serve(app) as base:
        runtime: Runtime = app.state.runtime
        started = {
            "app": app,
            "runtime": runtime,
            "pool": runtime.pool,
            "server": runtime.server,
            "runs": runtime.runs,
        }
        headers = {
            "Authorization": f"Bearer {token_for('alice', app_settings)}",
            "X-Chatkit-Resumable": "true",
        }
        body = {"type": "threads.create", "params": {"input": user_input("Count to two")}}
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as http,
            http.stream("POST", "/chatkit", json=body, headers=headers) as response,
        ):
            assert response.status_code == 200 and response.headers["x-chatkit-run"]
            lines = response.aiter_lines()
            async for line in lines:
                if DELTA in line:
                    break
            assert runtime.runs is not None
            (run,) = runtime.runs.runs()  # the reply, mid-stream
            ids = walked()
            assert [name for name, obj in started.items() if id(obj) in ids] == []
            assert id(run) in ids  # a reply's objects are collected as ever
            gate.set()
            rest = [line async for line in lines]
        assert sum(DELTA in line for line in rest) == 1
    # Stopped, the app hands its objects back: a process starting apps one after another (the
    # tests) does not keep each one's cycles for ever.
    assert gc.get_freeze_count() == 0
    assert id(runtime) in walked()
