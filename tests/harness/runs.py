"""A client of resumable replies (docs/runs.md) for the tests: opt in, read SSE events with their
``id: <run_id>:<seq>`` lines, stop reading at a chosen delta of a lockstep reply (the paced
model then waits for it: tests/harness/pacedmodel.py), resume and cancel.

Lockstep makes every cut land at a known point whatever the machine's load: the model cannot
emit delta i+1 before the client has acknowledged delta i, so a client that stops at delta i
without acknowledging it knows exactly what the reply has produced so far.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from agents.testing import ModelStep

from app.chat.offline_model import text_response_events
from tests.harness.deploy import DELTA_MARK, Lockstep, bearer_token

RESUMABLE = {"X-Chatkit-Resumable": "true"}


def held_reply(chunks: list[str], gate: asyncio.Event) -> ModelStep:
    """A scripted model's reply that streams its first delta, then waits for ``gate`` before
    the rest: a reply held mid-stream for as long as a test needs."""

    async def events(call: Any) -> AsyncIterator[Any]:
        all_events = list(text_response_events(chunks, item_id="msg_model"))
        for event in all_events[:4]:  # created, item added, part added, the first delta
            yield event
        await gate.wait()
        for event in all_events[4:]:
            yield event

    return ModelStep.stream(events)


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {bearer_token(user)}"}


@dataclass
class Event:
    run_id: str | None
    seq: int | None
    data: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.data.get("type"))

    @property
    def delta_index(self) -> int | None:
        update = self.data.get("update") or {}
        delta = update.get("delta") if isinstance(update, dict) else None
        mark = DELTA_MARK.search(delta) if isinstance(delta, str) else None
        return int(mark.group(1)) if mark else None


def parse_block(block: str) -> Event | None:
    event_id: str | None = None
    data: list[str] = []
    for line in block.split("\n"):
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if not data:
        return None  # a heartbeat comment
    run_id, seq = None, None
    if event_id is not None:
        run, _, number = event_id.rpartition(":")
        run_id, seq = run, int(number)
    return Event(run_id, seq, json.loads("\n".join(data)))


class Reader:
    """An SSE response read in parts: each ``read`` goes on where the last one stopped."""

    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.aiter_text()
        self._buffer = ""

    async def read(
        self, lockstep: Lockstep | None, *, stop_at_delta: int | None = None
    ) -> list[Event]:
        """Events until the stream ends, acknowledging each delta as it arrives; with
        ``stop_at_delta``, return as soon as that delta is in hand, without acknowledging it."""
        events: list[Event] = []
        while True:
            while "\n\n" in self._buffer:
                block, self._buffer = self._buffer.split("\n\n", 1)
                event = parse_block(block)
                if event is None:
                    continue
                events.append(event)
                index = event.delta_index
                if index is None:
                    continue
                if index == stop_at_delta:
                    return events
                if lockstep is not None:
                    lockstep.ack(index)
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                return events
            self._buffer += chunk.replace("\r\n", "\n")


async def read_events(
    response: httpx.Response, lockstep: Lockstep | None, *, stop_at_delta: int | None = None
) -> list[Event]:
    """``Reader(response).read(...)``, for a response read once."""
    return await Reader(response).read(lockstep, stop_at_delta=stop_at_delta)


def delta_indexes(events: list[Event]) -> list[int]:
    return [i for i in (e.delta_index for e in events) if i is not None]


def seqs(events: list[Event]) -> list[int]:
    return [e.seq for e in events if e.seq is not None]


async def items(client: httpx.AsyncClient, user: str, thread_id: str) -> list[dict[str, Any]]:
    response = await client.post(
        "/chatkit",
        json={
            "type": "items.list",
            "params": {"thread_id": thread_id, "limit": 50, "order": "asc"},
        },
        headers=auth(user),
    )
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def thread_of(events: list[Event]) -> str:
    return next(str(e.data["thread"]["id"]) for e in events if e.type == "thread.created")


def reply_text(item: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for part in item.get("content", []))
