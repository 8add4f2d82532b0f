"""Streaming through a real uvicorn on loopback: headers, heartbeats, and a client that
disconnects mid-reply (ChatKit's "stop" button does exactly that)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from agents.models.fake_id import FAKE_RESPONSES_ID
from agents.testing import ModelStep, ScriptedModel, assistant_message

from app.chat.offline_model import text_response_events
from app.http.runtime import Runtime
from app.main import create_app
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness.chatkit_client import token_for, user_input
from tests.harness.loopback import serve

ALICE = {"user_id": "alice"}
DEADLINE = 20.0  # generous upper bound for background work; never a speed assertion


async def eventually(check: Any, what: str) -> Any:
    """Poll ``check()`` until it returns something truthy (fails after DEADLINE seconds)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while True:
        result = await check()
        if result:
            return result
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def hanging_reply(
    chunks: list[str], *, started: asyncio.Event, cancelled: asyncio.Event
) -> ModelStep:
    """A model that streams ``chunks`` (with the Chat Completions placeholder id) and then
    never finishes, until it is cancelled."""

    async def events(call: Any) -> AsyncIterator[Any]:
        all_events = list(text_response_events(chunks, item_id=FAKE_RESPONSES_ID))
        try:
            for event in all_events[: 3 + len(chunks)]:  # created, added, part added, deltas
                yield event
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    return ModelStep.stream(events)


def gated_reply(text: str, gate: asyncio.Event) -> ModelStep:
    """A model that says nothing until ``gate`` opens (a slow tool call, say)."""

    async def events(call: Any) -> AsyncIterator[Any]:
        all_events = list(text_response_events([text], item_id="msg_model"))
        yield all_events[0]
        await gate.wait()
        for event in all_events[1:]:
            yield event

    return ModelStep.stream(events)


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any] | str]:
    """Events as they arrive; SSE comments come through as their raw line."""
    async for line in lines:
        if line.startswith(":"):
            yield line
        elif line.startswith("data: "):
            yield json.loads(line[6:])


async def test_disconnect_saves_partial_reply_and_marker(
    app_settings: Settings, store: PostgresStore
) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    model = ScriptedModel(
        [hanging_reply(["Partial ", "answer ", "so far"], started=started, cancelled=cancelled)]
    )
    app = create_app(app_settings, model=model)
    async with serve(app) as base:
        runtime: Runtime = app.state.runtime
        headers = {"Authorization": f"Bearer {token_for('alice', app_settings)}"}
        body = {"type": "threads.create", "params": {"input": user_input("Tell me a long story")}}
        thread_id = None
        deltas = 0
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as http,
            http.stream("POST", "/chatkit", json=body, headers=headers) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for event in sse_events(response.aiter_lines()):
                if isinstance(event, str):
                    continue
                if event["type"] == "thread.created":
                    thread_id = event["thread"]["id"]
                if event["type"] == "thread.item.updated":
                    deltas += 1
                if deltas == 3:
                    break  # leaving the block closes the connection mid-stream
        assert thread_id is not None and started.is_set()

        # The model call is stopped...
        await asyncio.wait_for(cancelled.wait(), DEADLINE)

        # ...and the partial reply and the "cancelled" marker are in the database.
        async def saved() -> list[Any]:
            items = (await store.load_thread_items(thread_id, None, 10, "asc", ALICE)).data
            return items if any(i.type == "sdk_hidden_context" for i in items) else []

        items = await eventually(saved, "the cancellation marker")
        assert [i.type for i in items] == [
            "user_message",
            "assistant_message",
            "sdk_hidden_context",
        ]
        partial = items[1]
        assert partial.content[0].text == "Partial answer so far"  # type: ignore[union-attr]
        assert partial.id.startswith("msg_") and partial.id != FAKE_RESPONSES_ID
        assert "cancelled" in items[2].content  # type: ignore[union-attr,operator]

        # Nothing is left running and no pooled connection is held.
        await eventually(lambda: _async(len(runtime.tasks) == 0), "background tasks to end")
        assert runtime.pool.in_use == 0
        labels = {"op": "threads.create", "outcome": "disconnected"}
        registry = runtime.metrics.registry
        assert registry.get_sample_value("chatkit_stream_duration_seconds_count", labels) == 1

        # The next turn tells the model about the interruption and keeps the partial text.
        model.enqueue([assistant_message("Sorry, stopping there.")])
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            next_turn = {
                "type": "threads.add_user_message",
                "params": {"thread_id": thread_id, "input": user_input("Thanks, enough")},
            }
            response = await http.post("/chatkit", json=next_turn, headers=headers)
            assert response.status_code == 200
        seen = json.dumps(model.calls[1].input)
        assert "Partial answer so far" in seen and "The user cancelled the stream" in seen
        assert runtime.pool.in_use == 0


async def _async(value: Any) -> Any:
    return value


async def test_heartbeat_while_the_model_is_silent(
    app_settings: Settings, store: PostgresStore
) -> None:
    gate = asyncio.Event()
    model = ScriptedModel([gated_reply("Finally, an answer.", gate)])
    settings = app_settings.model_copy(update={"sse_heartbeat_seconds": 0.05})
    app = create_app(settings, model=model)
    async with serve(app) as base:
        headers = {"Authorization": f"Bearer {token_for('alice', settings)}"}
        body = {"type": "threads.create", "params": {"input": user_input("Think hard")}}
        received: list[dict[str, Any] | str] = []
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as http,
            http.stream("POST", "/chatkit", json=body, headers=headers) as response,
        ):
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            async for event in sse_events(response.aiter_lines()):
                received.append(event)
                if event == ": ping":
                    gate.set()  # the model answers only once a heartbeat got through
    pings = [i for i, e in enumerate(received) if e == ": ping"]
    done = [
        i
        for i, e in enumerate(received)
        if isinstance(e, dict)
        and e["type"] == "thread.item.done"
        and e["item"]["type"] == "assistant_message"
    ]
    assert pings and done and pings[0] < done[0]
    assert received[done[0]]["item"]["content"][0]["text"] == "Finally, an answer."  # type: ignore[index]


async def test_disconnect_while_titling_keeps_the_reply_unmarked(
    app_settings: Settings, store: PostgresStore
) -> None:
    """The reply was complete: leaving during the title call saves no "cancelled" marker."""
    titling, title_cancelled = asyncio.Event(), asyncio.Event()

    async def slow_title(call: Any) -> Any:
        titling.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            title_cancelled.set()
            raise

    model = ScriptedModel(
        [[assistant_message("A complete answer.")], ModelStep.respond(slow_title)]
    )
    settings = app_settings.model_copy(update={"thread_titles": "model"})
    app = create_app(settings, model=model)
    async with serve(app) as base:
        runtime: Runtime = app.state.runtime
        headers = {"Authorization": f"Bearer {token_for('alice', settings)}"}
        body = {"type": "threads.create", "params": {"input": user_input("Question")}}
        thread_id = None
        async with (
            httpx.AsyncClient(base_url=base, timeout=30) as http,
            http.stream("POST", "/chatkit", json=body, headers=headers) as response,
        ):
            async for event in sse_events(response.aiter_lines()):
                if isinstance(event, dict) and event["type"] == "thread.created":
                    thread_id = event["thread"]["id"]
                if (
                    isinstance(event, dict)
                    and event["type"] == "thread.item.done"
                    and event["item"]["type"] == "assistant_message"
                ):
                    await asyncio.wait_for(titling.wait(), DEADLINE)
                    break
        assert thread_id is not None
        await asyncio.wait_for(title_cancelled.wait(), DEADLINE)
        await eventually(lambda: _async(len(runtime.tasks) == 0), "background tasks to end")
        items = (await store.load_thread_items(thread_id, None, 10, "asc", ALICE)).data
        assert [i.type for i in items] == ["user_message", "assistant_message"]
        assert (await store.load_thread(thread_id, ALICE)).title is None
        assert runtime.pool.in_use == 0
