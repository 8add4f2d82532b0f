"""A rolling restart across real processes (docs/runs.md#rolling-restarts): uvicorn processes A
and B serve the app with the paced model on one PostgreSQL database, and A gets SIGTERM while
replies stream from it.

* A refuses new work at once (a new connection is refused; a request whose body was still on
  its way gets a 503 JSON with Retry-After), its resumable reply runs on to its end, and the
  client it cut resumes through B and gets every event exactly once, in order.
* When ``SHUTDOWN_GRACE_SECONDS`` expires, a reply without the opt-in ends with one error
  event and its partial is stored; a resumable reply still running is stopped as a cancel
  stops it, and its resumer on B gets the error event and its stream ends.

Every cut lands at a known point (the paced model runs in lockstep, tests/harness/runs.py);
the only clocks are deadlines against hangs and the grace itself, which nothing asserts on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.deploy import Backend, Lockstep, pace_prompt, threads_create_body
from tests.harness.pg import PgServer
from tests.harness.runpair import (
    DEADLINE,
    DELTAS,
    assert_whole_reply,
    backend_env,
    new_user,
    resume_headers,
    start_all,
    start_reply,
    stored_types,
)
from tests.harness.runs import (
    RESUMABLE,
    Reader,
    auth,
    delta_indexes,
    read_events,
    reply_text,
    seqs,
    thread_of,
)


@pytest.fixture(scope="module")
def survivor(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """B: the replica that stays."""
    folder = tmp_path_factory.mktemp("restart")
    env = backend_env(folder, tmp_path_factory.getbasetemp().parent)
    backend = Backend(database_url=database_url, extra_env=env)
    try:
        start_all([backend], folder, "survivor")
        yield backend
    finally:
        backend.stop()


@contextlib.contextmanager
def replica(
    database_url: str, tmp_path: Path, base: Path, grace_seconds: float
) -> Iterator[Backend]:
    """A: a replica to stop, with its shutdown grace; uvicorn waits longer for connections
    than the app's grace (as compose and ``python -m app serve`` configure it)."""
    env = {**backend_env(tmp_path, base), "SHUTDOWN_GRACE_SECONDS": str(grace_seconds)}
    backend = Backend(
        database_url=database_url,
        extra_env=env,
        graceful_shutdown_seconds=int(grace_seconds) + 30,
    )
    try:
        start_all([backend], tmp_path, "replica")
        yield backend
    finally:
        backend.stop()


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


async def until_refused(backend: Backend) -> None:
    """Until A refuses connections (uvicorn closes its socket within a tick of SIGTERM)."""
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not await refused(backend.port):
        assert asyncio.get_running_loop().time() < deadline, "A still accepts connections"
        await asyncio.sleep(0.05)


async def half_sent(
    port: int, user: str, body: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request to A whose headers are in and whose handler waits for the body: uvicorn
    answers ``100 Continue`` once the app starts reading it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /chatkit HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth(user)['Authorization']}\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode())
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
    return reader, writer


def opted_in(
    client: httpx.AsyncClient, user: str, lockstep: Lockstep
) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
    body = threads_create_body(pace_prompt(DELTAS, 0, lockstep=lockstep))
    return client.stream("POST", "/chatkit", json=body, headers={**auth(user), **RESUMABLE})


async def test_sigterm_lets_the_run_finish_and_its_client_resumes_through_b(
    survivor: Backend,
    database_url: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    user = new_user()
    lockstep = Lockstep(tmp_path / "ls")
    base = tmp_path_factory.getbasetemp().parent
    with replica(database_url, tmp_path, base, grace_seconds=DEADLINE * 2) as a:
        assert a.proc is not None
        async with contextlib.AsyncExitStack() as stack:
            client_a, client_b = [
                await stack.enter_async_context(httpx.AsyncClient(base_url=x.url, timeout=30))
                for x in (a, survivor)
            ]
            async with asyncio.timeout(DEADLINE):
                late = json.dumps(threads_create_body(pace_prompt(2, 0))).encode()
                late_reader, late_writer = await half_sent(a.port, user, late)
                async with opted_in(client_a, user, lockstep) as attached:
                    run_id = attached.headers["x-chatkit-run"]
                    reader = Reader(attached)
                    first = await reader.read(lockstep, stop_at_delta=2)  # held at delta 2
                    a.proc.send_signal(signal.SIGTERM)
                    # The attached client is cut, not ended: it knows to resume.
                    with pytest.raises(httpx.TransportError):
                        await reader.read(lockstep)
                # A refuses new work while its run goes on: the body that arrives now is
                # refused with a 503 the client may retry, and new connections are refused.
                late_writer.write(late)
                await late_writer.drain()
                answer = await late_reader.read()
                late_writer.close()
                head, _, payload = answer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 503"), answer
                assert b"\r\nretry-after: 1\r\n" in head.lower() + b"\r\n"
                assert b'"code":"unavailable"' in payload
                await until_refused(a)
                assert a.proc.poll() is None  # the run holds it: it has not exited

                last = first[-1].seq
                assert last is not None
                resumes = await scrape(client_b)
                async with client_b.stream(
                    "GET",
                    f"/chatkit/runs/{run_id}/events",
                    headers=resume_headers(user, run_id, last),
                ) as response:
                    assert response.status_code == 200, await response.aread()
                    lockstep.ack(2)  # the reply goes on, on A, and reaches the client via B
                    rest = await Reader(response).read(lockstep)
                # B served it from the log (the reply runs on A).
                after = await scrape(client_b)
        key = 'chatkit_run_resumes_total{source="log"}'
        assert after[key] - resumes.get(key, 0.0) == 1
        everything = first + rest
        assert_whole_reply(everything, run_id)
        assert everything[-1].type != "error"
        # A exits once its run is logged to its end; nothing was cancelled.
        await asyncio.to_thread(a.proc.wait, DEADLINE)
        log = a.log()
        assert "cancelling background task" not in log and "grace over" not in log, log

    done = [e for e in everything if e.type == "thread.item.done"]
    text = reply_text(done[-1].data["item"])
    assert text.count("[d") == DELTAS and "timeout" not in text
    stored = await stored_types(PgServer.dsn(database_url), user, thread_of(everything))
    assert [t for t, _ in stored] == ["user_message", "assistant_message"]


async def test_when_the_grace_expires_replies_end_with_an_error_and_are_stored(
    survivor: Backend,
    database_url: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Issue 22: a replica stopped while streams run. A plain stream and a resumable reply,
    each held by its lockstep, outlast A's grace: both end with one error event (retry
    allowed) after the events their clients have, and both partials are stored with the
    cancel marker."""
    user, other = new_user(), new_user()
    plain_steps, run_steps = Lockstep(tmp_path / "plain"), Lockstep(tmp_path / "run")
    base = tmp_path_factory.getbasetemp().parent
    dsn = PgServer.dsn(database_url)
    with replica(database_url, tmp_path, base, grace_seconds=2) as a:
        assert a.proc is not None
        async with contextlib.AsyncExitStack() as stack:
            client_a, client_b = [
                await stack.enter_async_context(httpx.AsyncClient(base_url=x.url, timeout=30))
                for x in (a, survivor)
            ]
            async with asyncio.timeout(DEADLINE):
                body = threads_create_body(pace_prompt(DELTAS, 0, lockstep=plain_steps))
                plain = await stack.enter_async_context(
                    client_a.stream("POST", "/chatkit", json=body, headers=auth(other))
                )
                plain_reader = Reader(plain)
                plain_first = await plain_reader.read(plain_steps, stop_at_delta=1)
                async with opted_in(client_a, user, run_steps) as attached:
                    run_id = attached.headers["x-chatkit-run"]
                    reader = Reader(attached)
                    first = await reader.read(run_steps, stop_at_delta=2)
                    a.proc.send_signal(signal.SIGTERM)
                    with pytest.raises(httpx.TransportError):
                        await reader.read(run_steps)
                last = first[-1].seq
                assert last is not None
                async with client_b.stream(
                    "GET",
                    f"/chatkit/runs/{run_id}/events",
                    headers=resume_headers(user, run_id, last),
                ) as response:
                    assert response.status_code == 200, await response.aread()
                    # Neither delta is acknowledged: both replies outlast the grace.
                    rest = await Reader(response).read(None)
                plain_rest = await plain_reader.read(None)
            await asyncio.to_thread(a.proc.wait, DEADLINE)

    for events, held in ((plain_first + plain_rest, 1), (first + rest, 2)):
        assert events[-1].type == "error" and events[-1].data["allow_retry"] is True
        assert [e.type for e in events].count("error") == 1
        assert delta_indexes(events) == list(range(held + 1))
    assert seqs(first + rest) == list(range(1, len(first + rest) + 1))

    for owner, events, held in ((other, plain_first, 1), (user, first, 2)):
        stored = await stored_types(dsn, owner, thread_of(events))
        assert [t for t, _ in stored] == ["user_message", "assistant_message", "sdk_hidden_context"]
        assert f"[d{held}@" in stored[1][1] and f"[d{held + 1}@" not in stored[1][1]
        assert "cancelled" in stored[2][1]


# --- what an operator sees and bounds: metrics, the cap on resumers ---------------------------


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """B's metrics: ``name{labels}`` → value."""
    text = (await client.get("/metrics")).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


async def until_metric(
    client: httpx.AsyncClient, name: str, value: float, *, at_least: bool = False
) -> dict[str, float]:
    """Until B's metric ``name`` reads ``value`` (or more, ``at_least``): a client's leaving is
    noticed by the server a moment after it leaves, and a run's last log write may return after
    the reply has ended. The deadline only turns a bug into a failure."""
    deadline = asyncio.get_running_loop().time() + DEADLINE

    def reached(seen: dict[str, float]) -> bool:
        got = seen.get(name)
        return got is not None and (got >= value if at_least else got == value)

    while not reached(seen := await scrape(client)):
        assert asyncio.get_running_loop().time() < deadline, (name, seen.get(name))
        await asyncio.sleep(0.05)
    return seen


async def test_metrics_of_runs(survivor: Backend, tmp_path: Path) -> None:
    user = new_user()
    lockstep = Lockstep(tmp_path / "ls")
    async with httpx.AsyncClient(base_url=survivor.url, timeout=30) as client:
        before = await scrape(client)
        async with asyncio.timeout(DEADLINE):
            run_id, first = await start_reply(client, user, lockstep, stop_at=2)
            # Its client has gone: it runs on, detached.
            await until_metric(client, "chatkit_runs_detached", 1.0)
            seen = await scrape(client)
            assert seen["chatkit_runs_running"] == 1.0
            assert seen["chatkit_draining"] == 0.0
            last = first[-1].seq
            assert last is not None
            async with client.stream(
                "GET", f"/chatkit/runs/{run_id}/events", headers=resume_headers(user, run_id, last)
            ) as response:
                assert response.status_code == 200
                await until_metric(client, "chatkit_runs_detached", 0.0)
                lockstep.ack(2)
                await Reader(response).read(lockstep)
            await until_metric(client, "chatkit_runs_running", 0.0)
            # Ended: a replay (from memory or the log, depending on whether the run's last
            # write has returned yet; test_sigterm_... counts a resume from the log).
            replay = await client.get(f"/chatkit/runs/{run_id}/events", headers=auth(user))
            assert replay.status_code == 200
            # Every event is written, in batches (and heartbeats while the reply was held); the
            # last write may return after the reply has ended.
            events = "chatkit_run_log_batch_events_sum"
            wanted = before.get(events, 0.0) + len(first)
            after = await until_metric(client, events, wanted, at_least=True)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    local, logged = (grew(f'chatkit_run_resumes_total{{source="{s}"}}') for s in ("local", "log"))
    assert local >= 1 and local + logged == 2
    assert grew('chatkit_runs_ended_total{state="completed"}') == 1
    assert grew("chatkit_run_log_batch_events_count") >= 1


async def test_resumers_are_bounded_per_user(survivor: Backend, tmp_path: Path) -> None:
    """A resumer holds a stream lease like a reply: with MAX_STREAMS_PER_USER 2, a held run
    and one resumer are all a user may have; the next resumer gets a 429, on any replica,
    until one ends."""
    user = new_user()
    lockstep = Lockstep(tmp_path / "ls")
    async with httpx.AsyncClient(base_url=survivor.url, timeout=30) as client:
        async with asyncio.timeout(DEADLINE):
            run_id, _ = await start_reply(client, user, lockstep, stop_at=0)
            path = f"/chatkit/runs/{run_id}/events"
            async with client.stream("GET", path, headers=auth(user)) as first:
                assert first.status_code == 200
                over = await client.get(path, headers=auth(user))
                assert over.status_code == 429, over.text
                assert over.json()["error"]["code"] == "rate_limited"
                assert int(over.headers["retry-after"]) >= 1
                # Another user is not affected.
                assert (await client.get(path, headers=auth(new_user()))).status_code == 404
            # Once it has left, a resumer gets in again (its lease goes as its stream ends).
            second = await admitted(client, path, user)
            try:
                cancel = await client.post(f"/chatkit/runs/{run_id}/cancel", headers=auth(user))
                assert cancel.status_code == 202
                events = await read_events(second, None)  # it ends with the run
            finally:
                await second.aclose()
    assert seqs(events) == list(range(1, len(events) + 1))


async def admitted(client: httpx.AsyncClient, path: str, user: str) -> httpx.Response:
    """A resume stream, once the user's lease count lets it in (429s until then)."""
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while True:
        request = client.build_request("GET", path, headers=auth(user))
        response = await client.send(request, stream=True)
        if response.status_code != 429:
            assert response.status_code == 200
            return response
        await response.aclose()
        assert asyncio.get_running_loop().time() < deadline, "the first resumer's lease stayed"
        await asyncio.sleep(0.05)
