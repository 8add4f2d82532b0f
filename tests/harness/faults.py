"""Helpers of the fault tests (tests/http/test_faults.py, tests/pg/test_pg_restart.py,
test_pg_frozen.py, test_consistent_failure.py): bounded waits, what a 503 may say, and a model
that streams only when a test lets it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from agents import Model, ModelResponse
from fastapi import FastAPI

from app.chat.offline_model import text_response_events
from app.errors import ServiceUnavailableError
from app.http.runtime import Runtime
from app.pg.pool import ConnectionPool
from app.settings import Settings
from tests.harness.chatkit_client import error_text, token_for

DEADLINE = 10.0  # upper bound for anything we wait for; never a speed assertion
RECOVERY_SECONDS = 1.0  # the first request after the database is back succeeds this soon
SLACK_SECONDS = 1.0  # added to a configured timeout before a request counts as hanging

# Words that would say what broke: a 503 body is the generic message and nothing else.
LEAKS = ("asyncpg", "sqlalchemy", "errno", "refused", "reset", "timeout", "traceback", "lock")


# --- helpers -----------------------------------------------------------------------------------


def now() -> float:
    return asyncio.get_running_loop().time()


def report(what: str, seconds: float) -> None:
    print(f"\n[faults] {what}: {seconds * 1000:.0f} ms")


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = DEADLINE) -> Any:
    """Poll ``check()`` until it returns something truthy; fail after ``timeout`` seconds."""
    end = now() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert now() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def value(result: Any) -> Callable[[], Awaitable[Any]]:
    """A check for ``until`` from a plain callable."""

    async def check() -> Any:
        return result()

    return check


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "unavailable"
    assert error["message"] == ServiceUnavailableError.public_message
    assert set(error) <= {"code", "message", "request_id"}
    text = error_text(response).lower()
    assert not any(word in text for word in LEAKS), response.text


def stream_error(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The stream ended with ChatKit's retryable stream error, and it says nothing more."""
    assert events, "the stream sent nothing"
    last = events[-1]
    assert last["type"] == "error", events
    assert last["code"] == "stream.error" and last["allow_retry"] is True, last
    assert not any(word in json.dumps(last).lower() for word in LEAKS), last
    return last


async def sse_event(lines: AsyncIterator[str]) -> dict[str, Any] | None:
    """The next ``data:`` event of an SSE stream (comments skipped); None at its end."""
    async for line in lines:
        if line.startswith("data: "):
            event: dict[str, Any] = json.loads(line[6:])
            return event
    return None


def checked_out(pool: ConnectionPool) -> int:
    return pool.in_use


def all_seen_closed(pool: ConnectionPool) -> bool:
    """Whether asyncpg has seen every pooled connection's socket close. The proxy drops a link
    before the app's end has read the FIN: until asyncpg processes it, the pool cannot know the
    connection is dead, and a request borrowing it then is a 503 by luck, not by design."""
    holders = pool.pool._holders  # asyncpg's pool keeps no public view of its connections
    return all(h._con is None or h._con.is_closed() for h in holders)


async def pooled_pid(pool: ConnectionPool) -> int:
    """The server pid of the connection the pool hands out next (with one pooled connection,
    *the* connection)."""
    async with pool.acquire() as conn:
        return int(conn.get_server_pid())


class GatedModel(Model):
    """Streams the first words of its reply, then waits for ``gate`` before the rest: a model
    that thinks for as long as the test wants. ``waiting`` counts calls parked at the gate."""

    def __init__(self, before: tuple[str, ...] = ("Let me ",), after: tuple[str, ...] = ("see.",)):
        self.gate = asyncio.Event()
        self.waiting = 0
        self.calls = 0
        self.before = list(before)
        self.after = list(after)

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        raise AssertionError("replies are streamed")

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        self.calls += 1
        events = list(text_response_events([*self.before, *self.after], item_id="msg_gated"))
        head = 3 + len(self.before)  # created, item added, part added, the first deltas
        for event in events[:head]:
            yield event
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        for event in events[head:]:
            yield event


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
