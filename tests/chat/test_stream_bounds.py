"""A stream's memory and time are bounded whatever its client does, and a cut stream ends as a
disconnect does.

Clients here are raw sockets on loopback that send the request and never read. The server's
listening socket has a small send buffer (accepted sockets inherit it), the client a small
receive buffer, so the kernel holds a few KB and the server's own buffers fill at once (as
they would after megabytes with the kernel's autotuned buffers).

* ``STREAM_BUFFER_BYTES``: a reader that falls that far behind is cut; the reply so far and
  the SDK's "cancelled" marker are saved, the model call is stopped, the stream slot is freed.
* ``STREAM_STALL_SECONDS``: a write that waits that long cuts the stream, whether the model is
  still thinking (partial reply and marker saved) or the reply is complete and saved (kept as
  is: no marker), so a client that never reads holds neither a model run nor a slot.
* The model waits for the reply's reader: the Agents SDK's queue between them never holds more
  than ``app.chat.agent_run.WINDOW`` events, however fast the model writes.
* A cut leaves no task behind: no "Task exception was never retrieved" from the SDK's stream
  helper (it logged two per cut stream).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
from agents.testing import ModelStep, ScriptedModel

from app.chat.agent_run import WINDOW, _flow
from app.chat.offline_model import text_response_events
from app.http.runtime import Runtime
from app.main import create_app
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness.chatkit_client import token_for, user_input
from tests.harness.loopback import bound_socket, serve

ALICE = {"user_id": "alice"}
DEADLINE = 20.0  # generous upper bound for anything awaited; never a speed assertion
SMALL_BUFFER = 4096
DELTA = "x" * 1023 + " "  # 1 KB of text per delta


async def eventually(check: Any, what: str) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not (result := check()):
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return result


class Replies:
    """Model replies that record how they ended."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()  # the call ended before its last event
        self.sent = 0  # deltas handed to the run

    def endless(self) -> ModelStep:
        """1 KB deltas until the call is cancelled."""

        async def events(call: Any) -> AsyncIterator[Any]:
            head = list(text_response_events([DELTA], item_id="msg_endless"))
            try:
                for event in head[:3]:  # created, item added, part added
                    yield event
                while True:
                    self.sent += 1
                    yield head[3].model_copy(update={"sequence_number": 2 + self.sent})
                    await asyncio.sleep(0)
            finally:  # cancelled at an await, or closed at a yield
                self.cancelled.set()

        return ModelStep.stream(events)

    def then_silent(self, deltas: int) -> ModelStep:
        """``deltas`` deltas, then nothing until cancelled (a model thinking for ever)."""

        async def events(call: Any) -> AsyncIterator[Any]:
            evs = list(text_response_events([DELTA] * deltas, item_id="msg_silent"))
            try:
                for event in evs[: 3 + deltas]:
                    yield event
                    self.sent += 1
                await asyncio.Event().wait()
            finally:  # cancelled at an await, or closed at a yield
                self.cancelled.set()

        return ModelStep.stream(events)


@contextmanager
def tight_listener() -> Iterator[socket.socket]:
    sock = bound_socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    try:
        yield sock
    finally:
        sock.close()


@asynccontextmanager
async def never_reading(base: str, body: dict[str, Any], token: str) -> AsyncIterator[None]:
    """A client that sends ``body`` to /chatkit and never reads; closed on exit."""
    port = int(base.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    request = (
        f"POST /chatkit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        yield
    finally:
        sock.close()


def closed_as(runtime: Runtime, outcome: str) -> float | None:
    labels = {"op": "threads.create", "outcome": outcome}
    return runtime.metrics.registry.get_sample_value(
        "chatkit_stream_duration_seconds_count", labels
    )


async def only_thread(store: PostgresStore) -> str:
    threads = (await store.load_threads(10, None, "desc", ALICE)).data
    assert len(threads) == 1, threads
    return threads[0].id


async def item_types(store: PostgresStore, thread_id: str) -> list[str]:
    return [i.type for i in (await store.load_thread_items(thread_id, None, 10, "asc", ALICE)).data]


async def settled(runtime: Runtime) -> None:
    """Every stream closed and every background save done."""
    await eventually(lambda: runtime.open_streams == 0, "the stream slot to be freed")
    await eventually(lambda: len(runtime.tasks) == 0, "background tasks to end")
    assert runtime.pool.in_use == 0


CREATE = {"type": "threads.create", "params": {"input": user_input("Tell me everything")}}


async def test_a_reader_too_far_behind_is_cut_and_its_reply_kept(
    app_settings: Settings, store: PostgresStore
) -> None:
    replies = Replies()
    settings = app_settings.model_copy(
        update={"stream_buffer_bytes": SMALL_BUFFER, "stream_stall_seconds": 3600.0}
    )
    app = create_app(settings, model=ScriptedModel([replies.endless()]))
    with tight_listener() as listener:
        async with serve(app, sock=listener) as base:
            runtime: Runtime = app.state.runtime
            async with never_reading(base, CREATE, token_for("alice", settings)):
                await asyncio.wait_for(replies.cancelled.wait(), DEADLINE)
                await settled(runtime)  # while the client is still connected
                assert closed_as(runtime, "stalled") == 1
            thread_id = await only_thread(store)
            items = (await store.load_thread_items(thread_id, None, 10, "asc", ALICE)).data
            assert [i.type for i in items] == [
                "user_message",
                "assistant_message",
                "sdk_hidden_context",
            ]
            kept = items[1].content[0].text  # type: ignore[union-attr]
            assert kept and kept == DELTA * (len(kept) // len(DELTA))  # whole deltas, in order


async def test_a_reader_that_stops_is_cut_after_the_stall_deadline(
    app_settings: Settings, store: PostgresStore
) -> None:
    """The model thinks for ever after its first words; the client reads nothing: the stall
    deadline ends both, as a disconnect would."""
    replies = Replies()
    settings = app_settings.model_copy(
        update={"stream_buffer_bytes": 64 * 2**20, "stream_stall_seconds": 0.5}
    )
    app = create_app(settings, model=ScriptedModel([replies.then_silent(400)]))
    with tight_listener() as listener:
        async with serve(app, sock=listener) as base:
            runtime: Runtime = app.state.runtime
            async with never_reading(base, CREATE, token_for("alice", settings)):
                await asyncio.wait_for(replies.cancelled.wait(), DEADLINE)
                await settled(runtime)
                assert closed_as(runtime, "stalled") == 1
            thread_id = await only_thread(store)
            items = (await store.load_thread_items(thread_id, None, 10, "asc", ALICE)).data
            assert [i.type for i in items] == [
                "user_message",
                "assistant_message",
                "sdk_hidden_context",
            ]
            assert items[1].content[0].text == DELTA * 400  # type: ignore[union-attr]


async def test_a_complete_reply_is_kept_whole_when_its_reader_stalls(
    app_settings: Settings, store: PostgresStore
) -> None:
    """The reply is finished and saved; only its delivery waits on a client that reads
    nothing: the stall deadline frees the slot, and the reply stays as it is (no marker).

    The deadline must come after the reply is done (400 scripted deltas, well under 0.5 s on an
    idle machine): 3 s keeps that true on a loaded CI machine, where 0.5 s once cut the reply
    before its end (a partial reply with its marker)."""
    settings = app_settings.model_copy(
        update={"stream_buffer_bytes": 64 * 2**20, "stream_stall_seconds": 3.0}
    )
    model = ScriptedModel(
        [
            ModelStep.stream(
                lambda call: _aiter(text_response_events([DELTA] * 400, item_id="msg_whole"))
            )
        ]
    )
    app = create_app(settings, model=model)
    with tight_listener() as listener:
        async with serve(app, sock=listener) as base:
            runtime: Runtime = app.state.runtime
            async with never_reading(base, CREATE, token_for("alice", settings)):
                await eventually(lambda: closed_as(runtime, "stalled"), "the stream to be cut")
                await settled(runtime)
                assert closed_as(runtime, "stalled") == 1
            thread_id = await only_thread(store)
            items = (await store.load_thread_items(thread_id, None, 10, "asc", ALICE)).data
            assert [i.type for i in items] == ["user_message", "assistant_message"]
            assert items[1].content[0].text == DELTA * 400  # type: ignore[union-attr]


async def _aiter(events: Any) -> AsyncIterator[Any]:
    for event in events:
        yield event


async def test_the_model_waits_for_the_reply_reader(make_client: Any, store: PostgresStore) -> None:
    """A model that writes 2,000 deltas without ever yielding the event loop: the run's queue
    still never holds more than WINDOW events (it held all of them before)."""
    seen: list[int] = []

    async def events(call: Any) -> AsyncIterator[Any]:
        for event in text_response_events(["word "] * 2000, item_id="msg_fast"):
            flow = _flow.get()
            seen.append(flow.backlog() if flow is not None else -1)
            yield event

    client = await make_client(ScriptedModel([ModelStep.stream(events)]))
    _, created = await client.create_thread("Go fast")
    done = [e for e in created if e["type"] == "thread.item.done"]
    assert done[-1]["item"]["content"][0]["text"] == "word " * 2000
    assert len(seen) > 2000 and min(seen) >= 0, "the model ran outside a paced reply"
    assert max(seen) <= WINDOW, max(seen)


@pytest.mark.parametrize("cut", ["disconnect", "stall"])
async def test_a_cut_stream_leaves_no_task_exception_behind(
    app_settings: Settings, store: PostgresStore, caplog: pytest.LogCaptureFixture, cut: str
) -> None:
    """A client that leaves mid-reply, or one that stops reading: once the abandoned tasks
    are garbage, none logs "Task exception was never retrieved" (two did per cut before)."""
    replies = Replies()
    settings = app_settings.model_copy(update={"stream_stall_seconds": 0.5})
    app = create_app(settings, model=ScriptedModel([replies.then_silent(400)]))
    caplog.set_level(logging.ERROR, logger="asyncio")
    with tight_listener() as listener:
        async with serve(app, sock=listener) as base:
            runtime: Runtime = app.state.runtime
            token = token_for("alice", settings)
            if cut == "disconnect":
                async with (
                    httpx.AsyncClient(base_url=base, timeout=30) as http,
                    http.stream(
                        "POST",
                        "/chatkit",
                        json=CREATE,
                        headers={"Authorization": f"Bearer {token}"},
                    ) as response,
                ):
                    async for line in response.aiter_lines():
                        if '"thread.item.updated"' in line:
                            break  # leaving closes the connection mid-reply
                await asyncio.wait_for(replies.cancelled.wait(), DEADLINE)
                await settled(runtime)
            else:
                async with never_reading(base, CREATE, token):
                    await asyncio.wait_for(replies.cancelled.wait(), DEADLINE)
                    await settled(runtime)
            assert closed_as(runtime, "disconnected" if cut == "disconnect" else "stalled") == 1
    for _ in range(3):  # the abandoned tasks are garbage now: collect them
        gc.collect()
        await asyncio.sleep(0)
    never_retrieved = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert never_retrieved == [], [r.getMessage()[:200] for r in never_retrieved]
