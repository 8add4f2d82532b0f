"""Per-user limits (app.pg.limits), for real.

* Across processes: two real uvicorn backends (``tests.harness.deploy.Backend``: the production
  app in child processes, with the paced model) share the test database. One user's requests,
  alternating between them or fired at both at once, get exactly the per-minute budget; streams
  count toward ``MAX_STREAMS_PER_USER`` whichever process serves them, and their leases are
  gone when they end (completed or cut by the client); ``/files`` spends the same budget.
* In process: two tabs on one thread take turns (the waiting one holds no database
  connection), or the second is refused inside the stream when it may not wait; a crashed
  process's expired leases block nothing; ``MAX_OUTPUT_TOKENS`` reaches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from agents import Model
from sqlalchemy.ext.asyncio import AsyncEngine

from app.chat.offline_model import demo_reply, text_response_events, words_of
from app.ids import new_id
from tests.harness.chatkit_client import (
    ChatKitClient,
    MakeClient,
    assistant_text,
    done_items,
    of_type,
    parse_sse,
    user_input,
)
from tests.harness.deploy import Backend, bearer_token, pace_prompt, threads_create_body
from tests.harness.fake_openai import FakeChatCompletions
from tests.harness.loopback import serve
from tests.harness.pg import PgServer
from tests.harness.runpair import start_all

RATE_PER_MINUTE = 30  # a burst of 30, then one request every 2 s
INTERVAL = 60 / RATE_PER_MINUTE
MAX_STREAMS = 2
LIST_BODY = {"type": "threads.list", "params": {"limit": 1}}


# --- two backend processes on one database --------------------------------------------------


@dataclass
class Pair:
    backends: list[Backend]
    clients: list[httpx.AsyncClient]
    dsn: str

    def client(self, n: int) -> httpx.AsyncClient:
        """Alternate: request ``n`` goes to process ``n % 2``."""
        return self.clients[n % 2]

    def logs(self) -> str:
        return "\n".join(f"--- backend {i} ---\n{b.log()}" for i, b in enumerate(self.backends))


@pytest.fixture(scope="module")
def backends(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Backend]]:
    folder = tmp_path_factory.mktemp("limits")
    env = {
        "RATE_LIMIT_PER_MINUTE": str(RATE_PER_MINUTE),
        "MAX_STREAMS_PER_USER": str(MAX_STREAMS),
        # Long, so a lease row still present after a stream ended is one that was not released
        # (not one that expired and awaits its purge).
        "STREAM_LEASE_SECONDS": "30",
        "DATA_DIR": str(folder / "data"),
        "ATTACHMENT_SIGNING_SECRET": "limits-tests-signing-secret-" + "z" * 20,
        # Bytecode cached outside the checkout (kept between runs): a start then costs the
        # imports, not compiling them.
        "PYTHONDONTWRITEBYTECODE": "",
        "PYTHONPYCACHEPREFIX": str(tmp_path_factory.getbasetemp().parent / "chatkit-pg-pycache"),
    }
    pair = [Backend(database_url=database_url, extra_env=dict(env)) for _ in range(2)]
    try:
        start_all(pair, folder, "backend")
        yield pair
    finally:
        for backend in pair:
            backend.stop()


@pytest.fixture
async def two(backends: list[Backend], database_url: str) -> AsyncIterator[Pair]:
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=b.url, timeout=30))
            for b in backends
        ]
        yield Pair(backends, clients, PgServer.dsn(database_url))


def new_user(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {bearer_token(user)}"}


async def list_threads(client: httpx.AsyncClient, user: str) -> httpx.Response:
    return await client.post("/chatkit", json=LIST_BODY, headers=auth(user))


def assert_rate_limited(response: httpx.Response, *, max_retry_after: float) -> int:
    """A 429 JSON ``rate_limited`` answer with an integer ``Retry-After`` in [1, max]."""
    assert response.status_code == 429, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert error["code"] == "rate_limited", error
    assert error["message"]
    raw = response.headers.get("retry-after")
    assert raw is not None and re.fullmatch(r"[0-9]+", raw), raw
    retry_after = int(raw)
    assert 1 <= retry_after <= max_retry_after, retry_after
    return retry_after


async def lease_rows(dsn: str, user: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        # The test's role owns the tables (RLS is not FORCEd), so it sees every row.
        return await conn.fetch(
            "SELECT id, thread_id, expires_at > now() AS live FROM chatkit_stream_leases "
            "WHERE user_id = $1",
            user,
        )
    finally:
        await conn.close()


async def count_threads(dsn: str, user: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM chatkit_threads WHERE user_id = $1", user)
        )
    finally:
        await conn.close()


def refills_within(elapsed: float) -> int:
    """How many requests' worth of budget can come back in ``elapsed`` seconds (measured
    around the requests, so never less than the server saw): the rate's steady refill."""
    return math.floor(elapsed / INTERVAL)


async def wait_until(check: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)


# --- 1. the request budget across processes -------------------------------------------------


async def test_burst_alternating_between_processes_admits_exactly_the_budget(two: Pair) -> None:
    user, other = new_user("burst"), new_user("bystander")
    statuses: list[int] = []
    refused: list[httpx.Response] = []
    started = time.monotonic()
    for n in range(RATE_PER_MINUTE + 15):
        response = await list_threads(two.client(n), user)
        statuses.append(response.status_code)
        if response.status_code == 429:
            refused.append(response)
    refills = refills_within(time.monotonic() - started)
    # The whole budget first, then refusals; only what came back meanwhile is admitted again
    # (none when the burst fits in one interval, as it does on an idle machine).
    assert statuses[:RATE_PER_MINUTE] == [200] * RATE_PER_MINUTE, (statuses, two.logs())
    extra = statuses[RATE_PER_MINUTE:].count(200)
    assert extra <= refills, (refills, statuses, two.logs())
    if refills == 0:
        assert statuses == [200] * RATE_PER_MINUTE + [429] * 15, (statuses, two.logs())
    retry_afters = [assert_rate_limited(r, max_retry_after=math.ceil(INTERVAL)) for r in refused]
    if refills:
        # A slow burst: start the steady-rate check below from a fresh refusal.
        probe = await list_threads(two.client(0), user)
        while probe.status_code == 200:
            probe = await list_threads(two.client(0), user)
        retry_afters.append(assert_rate_limited(probe, max_retry_after=math.ceil(INTERVAL)))

    # Another user spends their own budget, on either process.
    for n in range(2):
        response = await list_threads(two.client(n), other)
        assert response.status_code == 200, response.text

    # After Retry-After one request is admitted again (on the other process than the last
    # refusal), and only one: the budget comes back at the steady rate, not as a new burst.
    await asyncio.sleep(retry_afters[-1] + 0.05)
    again = await list_threads(two.client(1), user)
    assert again.status_code == 200, again.text
    next_one = await list_threads(two.client(0), user)
    assert_rate_limited(next_one, max_retry_after=math.ceil(INTERVAL))


async def test_concurrent_requests_over_both_processes_never_over_admit(two: Pair) -> None:
    user = new_user("race")
    started = time.monotonic()
    responses = await asyncio.gather(*(list_threads(two.client(n), user) for n in range(50)))
    refills = refills_within(time.monotonic() - started)
    statuses = [r.status_code for r in responses]
    # Exactly the budget, plus only what came back while the requests were in flight (none
    # when they fit in one interval, as on an idle machine).
    assert RATE_PER_MINUTE <= statuses.count(200) <= RATE_PER_MINUTE + refills, (
        refills,
        statuses,
        two.logs(),
    )
    assert statuses.count(429) == 50 - statuses.count(200), statuses
    for response in responses:
        if response.status_code == 429:
            assert_rate_limited(response, max_retry_after=math.ceil(INTERVAL))
    # Both processes admitted some: the budget really was shared, not one process's alone.
    by_process = [
        sum(1 for n, r in enumerate(responses) if n % 2 == p and r.status_code == 200)
        for p in (0, 1)
    ]
    assert all(by_process), by_process


# --- 6. /files spends the same budget ----------------------------------------------------------


async def test_file_upload_counts_against_the_same_budget(two: Pair) -> None:
    user = new_user("files")
    started = time.monotonic()
    upload = await two.client(0).post(
        "/files", files={"file": ("a.txt", b"hello", "text/plain")}, headers=auth(user)
    )
    assert upload.status_code == 200, upload.text
    statuses = [(await list_threads(two.client(n + 1), user)).status_code for n in range(30)]
    refused_upload = await two.client(1).post(
        "/files", files={"file": ("b.txt", b"hello", "text/plain")}, headers=auth(user)
    )
    refills = refills_within(time.monotonic() - started)
    # One upload and 29 ChatKit requests make the 30 of the budget.
    assert statuses[: RATE_PER_MINUTE - 1] == [200] * (RATE_PER_MINUTE - 1), statuses
    if refills == 0:
        assert statuses[-1] == 429, statuses
        assert_rate_limited(refused_upload, max_retry_after=math.ceil(INTERVAL))
    else:  # a slow run: what came back may have been spent, never more
        admitted = statuses.count(200) + 1 + (refused_upload.status_code == 200)
        assert admitted <= RATE_PER_MINUTE + refills, (refills, statuses)


# --- 2. concurrent streams per user across processes ------------------------------------------


class OpenStream:
    """A streaming POST read in a task of its own; ``start`` returns once its first event
    arrived, ``disconnect`` drops the connection mid-stream."""

    def __init__(self, client: httpx.AsyncClient, user: str, body: dict[str, Any]) -> None:
        self.client, self.user, self.body = client, user, body
        self.first = asyncio.Event()
        self.events: list[dict[str, Any]] = []
        self.status: int | None = None
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        headers = {**auth(self.user), "Accept": "text/event-stream"}
        async with self.client.stream("POST", "/chatkit", json=self.body, headers=headers) as r:
            self.status = r.status_code
            assert r.headers["content-type"].startswith("text/event-stream"), r.headers
            buffer = ""
            async for text in r.aiter_text():
                buffer += text
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    data = [ln[6:] for ln in block.split("\n") if ln.startswith("data: ")]
                    if data:
                        self.events.append(json.loads("\n".join(data)))
                        self.first.set()

    async def start(self) -> OpenStream:
        self.task = asyncio.create_task(self._run())
        first = asyncio.create_task(self.first.wait())
        done, _ = await asyncio.wait({first, self.task}, timeout=15, return_when="FIRST_COMPLETED")
        first.cancel()
        if self.task in done:
            self.task.result()  # raises what went wrong
            raise AssertionError(f"stream ended before its first event: {self.events}")
        assert done, "no first event within 15 s"
        return self

    async def finish(self, timeout: float = 30) -> list[dict[str, Any]]:
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout)
        return self.events

    async def disconnect(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    @property
    def thread_id(self) -> str:
        return str(of_type(self.events, "thread.created")[0]["thread"]["id"])


async def test_stream_limit_holds_across_processes_and_leases_are_released(two: Pair) -> None:
    user = new_user("streams")
    slow = threads_create_body(pace_prompt(deltas=30, interval_ms=100))  # ~3 s
    very_slow = threads_create_body(pace_prompt(deltas=200, interval_ms=100))  # ~20 s
    first = await OpenStream(two.client(0), user, slow).start()
    second = await OpenStream(two.client(1), user, very_slow).start()
    assert len(await lease_rows(two.dsn, user)) == MAX_STREAMS

    # A third stream, on either process, is refused before anything streams or is stored.
    for n in range(2):
        refused = await two.client(n).post("/chatkit", json=slow, headers=auth(user))
        assert_rate_limited(refused, max_retry_after=60)
    assert await count_threads(two.dsn, user) == MAX_STREAMS
    # ... while another user streams freely.
    stranger = await OpenStream(two.client(0), new_user("stranger"), slow).start()

    # When one finishes, a new stream is admitted at once (the lease went before the stream's
    # end reached the client).
    events = await first.finish()
    assert done_items(events, "assistant_message"), events
    assert {r["thread_id"] for r in await lease_rows(two.dsn, user)} == {second.thread_id}
    third = await OpenStream(two.client(1), user, very_slow).start()
    assert len(await lease_rows(two.dsn, user)) == MAX_STREAMS

    # A client that goes away mid-stream leaves no lease behind (30 s leases: only a release
    # removes the rows this quickly).
    await third.disconnect()
    await second.disconnect()

    async def no_leases() -> bool:
        return not await lease_rows(two.dsn, user)

    await wait_until(no_leases, 5, f"the leases of {user} released after disconnects")
    await stranger.finish()
    again = await OpenStream(two.client(0), user, slow).start()
    await again.finish()
    await wait_until(no_leases, 5, "the lease of a completed stream released")


# --- 3. two tabs on one thread -----------------------------------------------------------------


def last_user_text(model_input: Any) -> str:
    if isinstance(model_input, str):
        return model_input
    for item in reversed(list(model_input)):
        if not isinstance(item, dict) or item.get("role") != "user":
            continue
        content = item.get("content")
        if isinstance(content, str):
            return content
        texts = [p.get("text", "") for p in content or [] if p.get("type") == "input_text"]
        if texts and not texts[0].startswith("Hidden context"):
            return str(texts[0])
    return ""


class EchoModel(Model):
    """Answers "Reply to <message>." word by word; a message starting with "hold" waits for
    ``gate`` first (``holding`` is set then), so a reply can be kept streaming at will."""

    def __init__(self, word_delay: float = 0.0) -> None:
        self.word_delay = word_delay
        self.gate = asyncio.Event()
        self.holding = asyncio.Event()
        self.calls: list[str] = []

    async def get_response(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("only streamed replies are expected")

    async def stream_response(  # type: ignore[override]
        self, system_instructions: str | None, input: Any, *args: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        text = last_user_text(input)
        self.calls.append(text)
        if text.startswith("hold"):
            self.holding.set()
            await self.gate.wait()
        for event in text_response_events(words_of(f"Reply to {text}."), item_id=new_id("msg")):
            if event.type == "response.output_text.delta" and self.word_delay:
                await asyncio.sleep(self.word_delay)
            yield event


def item_text(item: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for part in item.get("content", []))


async def thread_items(client: ChatKitClient, thread_id: str) -> list[dict[str, Any]]:
    page = await client.call("items.list", {"thread_id": thread_id, "order": "asc", "limit": 50})
    items = [i for i in page["data"] if i["type"] in ("user_message", "assistant_message")]
    # items.list's order is the order of creation.
    assert [i["created_at"] for i in items] == sorted(i["created_at"] for i in items)
    return items


def pairs(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(user text, its reply) for a thread that alternates user and assistant messages."""
    kinds = [i["type"] for i in items]
    assert kinds == ["user_message", "assistant_message"] * (len(items) // 2), [
        (i["type"], item_text(i)) for i in items
    ]
    return [(item_text(items[n]), item_text(items[n + 1])) for n in range(0, len(items), 2)]


async def stored_texts(engine: AsyncEngine, thread_id: str) -> list[str]:
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        rows = await raw.fetch(
            "SELECT data FROM chatkit_items WHERE thread_id = $1 ORDER BY created_at", thread_id
        )
    return [
        item_text(json.loads(r["data"]) if isinstance(r["data"], str) else r["data"]) for r in rows
    ]


async def test_two_tabs_sending_at_once_take_turns(make_client: MakeClient) -> None:
    model = EchoModel(word_delay=0.05)  # each reply streams for about 0.2 s
    client = await make_client(model=model, thread_busy_wait_seconds=10)
    thread_id, _ = await client.create_thread("hello")
    first, second = await asyncio.gather(
        client.send(thread_id, "tab one"), client.send(thread_id, "tab two")
    )
    for events, text in ((first, "tab one"), (second, "tab two")):
        assert not of_type(events, "error"), events
        (reply,) = done_items(events, "assistant_message")
        assert assistant_text(reply) == f"Reply to {text}."

    found = pairs(await thread_items(client, thread_id))
    assert found[0] == ("hello", "Reply to hello.")
    # Each reply directly follows its own message, whichever tab won the race.
    assert sorted(found[1:]) == [
        ("tab one", "Reply to tab one."),
        ("tab two", "Reply to tab two."),
    ], found


async def long_transactions(engine: AsyncEngine) -> list[str]:
    """Queries of other sessions of this database whose transaction is open for 200 ms or more
    (a lease poll's own transaction lasts a few milliseconds)."""
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        rows = await raw.fetch(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL "
            "AND clock_timestamp() - xact_start > interval '200 milliseconds'"
        )
    return [r["query"] for r in rows]


async def test_waiting_tab_holds_no_connection_and_goes_second(
    make_client: MakeClient, engine: AsyncEngine
) -> None:
    model = EchoModel()
    client = await make_client(model=model, thread_busy_wait_seconds=10)
    pool = client.app.state.runtime.pool
    thread_id, _ = await client.create_thread("hello")

    first = asyncio.create_task(client.send(thread_id, "hold tab one"))
    await asyncio.wait_for(model.holding.wait(), 10)

    async def pool_idle() -> bool:
        return bool(pool.in_use == 0)

    # The held reply's own store calls finish; it streams holding no connection.
    await wait_until(pool_idle, 5, "the held reply returns its connections", interval=0.01)
    second = asyncio.create_task(client.send(thread_id, "tab two"))

    # For 1.5 s (six polls of the lease), the second tab waits without a connection of the
    # app's pool and without an open transaction. Its polls borrow a connection for a few
    # milliseconds each, so nearly every sample must find none checked out.
    samples: list[int] = []
    open_transactions: list[str] = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        samples.append(pool.in_use)
        if len(samples) % 10 == 0:
            open_transactions += await long_transactions(engine)
        await asyncio.sleep(0.01)
    assert not second.done(), second.result()
    assert max(samples) <= 1, samples
    assert samples.count(0) >= 0.8 * len(samples), samples
    assert not open_transactions, open_transactions
    assert model.calls == ["hello", "hold tab one"]
    assert "tab two" not in await stored_texts(engine, thread_id)

    model.gate.set()
    first_events, second_events = await asyncio.wait_for(asyncio.gather(first, second), 15)
    for events in (first_events, second_events):
        assert not of_type(events, "error"), events
    assert pairs(await thread_items(client, thread_id)) == [
        ("hello", "Reply to hello."),
        ("hold tab one", "Reply to hold tab one."),
        ("tab two", "Reply to tab two."),
    ]
    assert model.calls == ["hello", "hold tab one", "tab two"]


@pytest.mark.parametrize("wait_seconds", [0.0, 0.75])
async def test_tab_that_may_not_wait_gets_one_busy_error_event(
    make_client: MakeClient, engine: AsyncEngine, wait_seconds: float
) -> None:
    model = EchoModel()
    client = await make_client(model=model, thread_busy_wait_seconds=wait_seconds)
    thread_id, _ = await client.create_thread("hello")
    first = asyncio.create_task(client.send(thread_id, "hold tab one"))
    await asyncio.wait_for(model.holding.wait(), 10)

    started = time.monotonic()
    response = await client.request(
        "threads.add_user_message", {"thread_id": thread_id, "input": user_input("tab two")}
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert len(events) == 1, events
    (error,) = events
    assert error["type"] == "error" and error["allow_retry"] is True, error
    assert "still answering" in error.get("message", ""), error
    assert wait_seconds - 0.3 <= elapsed <= wait_seconds + 1.0, elapsed

    model.gate.set()
    await asyncio.wait_for(first, 15)
    # The refused message was never stored nor answered.
    assert "tab two" not in await stored_texts(engine, thread_id)
    assert pairs(await thread_items(client, thread_id)) == [
        ("hello", "Reply to hello."),
        ("hold tab one", "Reply to hold tab one."),
    ]
    assert model.calls == ["hello", "hold tab one"]


# --- 4. a crashed process's leases -------------------------------------------------------------


async def insert_lease(
    engine: AsyncEngine, user: str, thread_id: str | None, seconds_from_now: float
) -> str:
    lease_id = new_id("lease")
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.execute(
            "INSERT INTO chatkit_stream_leases (user_id, id, thread_id, expires_at) "
            "VALUES ($1, $2, $3, now() + make_interval(secs => $4::float8))",
            user,
            lease_id,
            thread_id,
            seconds_from_now,
        )
    return lease_id


async def lease_ids(engine: AsyncEngine, user: str) -> set[str]:
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        rows = await raw.fetch("SELECT id FROM chatkit_stream_leases WHERE user_id = $1", user)
    return {r["id"] for r in rows}


async def test_expired_leases_of_a_crashed_process_block_nothing(
    make_client: MakeClient, engine: AsyncEngine
) -> None:
    # No waiting and one stream per user: any lease that counted would show at once.
    client = await make_client(thread_busy_wait_seconds=0, max_streams_per_user=1)
    thread_id, _ = await client.create_thread("hello")

    # A live lease (a process still streaming to the thread) is honoured ...
    live = await insert_lease(engine, "alice", thread_id, 60)
    events = await client.send(thread_id, "blocked")
    assert [e["type"] for e in events] == ["error"], events
    other = await client.request("threads.create", {"input": user_input("new")})
    assert other.status_code == 429, other.text
    assert await lease_ids(engine, "alice") == {live}

    # ... an expired one, on the thread and counting toward the stream limit, is not.
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.execute(
            "UPDATE chatkit_stream_leases SET expires_at = now() - interval '1 minute' "
            "WHERE id = $1",
            live,
        )
    stray = await insert_lease(engine, "alice", None, -5)
    # With no waiting configured, a lease that counted would be an error event at once: the
    # reply itself is the proof (no duration to bound, so load cannot fail this).
    events = await client.send(thread_id, "admitted")
    assert not of_type(events, "error"), events
    assert done_items(events, "assistant_message"), events
    remaining = await lease_ids(engine, "alice")
    assert not remaining, f"expired leases ({live}, {stray}) purged, own released: {remaining}"


# --- 5. MAX_OUTPUT_TOKENS ----------------------------------------------------------------------


async def test_max_output_tokens_reaches_an_openai_compatible_server(
    make_client: MakeClient,
) -> None:
    fake = FakeChatCompletions()
    async with serve(fake.app) as base:
        client = await make_client(
            openai_base_url=f"{base}/v1", model_name="fake-model", max_output_tokens=7
        )
        await client.create_thread("Hi")
    (body,) = fake.streamed_requests
    sent = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if k in body}
    assert sent and set(sent.values()) == {7}, body


async def test_max_output_tokens_cuts_the_offline_reply(make_client: MakeClient) -> None:
    full = words_of(demo_reply("Hi there"))
    assert len(full) > 5

    limited = await make_client(openai_base_url=None, openai_api_key=None, max_output_tokens=5)
    thread_id, events = await limited.create_thread("Hi there")
    (reply,) = done_items(events, "assistant_message")
    text = assistant_text(reply)
    assert len(text.split()) == 5, text
    assert text == "".join(full[:5]), text
    stored = await thread_items(limited, thread_id)
    assert item_text(stored[-1]) == text

    unlimited = await make_client(openai_base_url=None, openai_api_key=None, max_output_tokens=None)
    _, events = await unlimited.create_thread("Hi there")
    (reply,) = done_items(events, "assistant_message")
    assert assistant_text(reply) == "".join(full)
