"""Resumable replies across real processes (docs/runs.md): two uvicorn processes serving the app
with the paced model on one PostgreSQL database; a reply started on A is resumed, and
cancelled, through B; A killed with SIGKILL mid-reply leaves its resumers one final error.

Every cut lands at a known point: the paced model runs in lockstep (it emits delta i+1 only
once the client has acknowledged delta i, tests/harness/pacedmodel.py), so a client that stops
reading at delta i without acknowledging it holds the reply there, however loaded the machine.
No assertion depends on timing; the only clocks are deadlines against hangs.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.cli.prune import prune
from app.settings import Settings
from tests.harness.deploy import Backend, Lockstep, pace_prompt, threads_create_body
from tests.harness.pg import PgServer
from tests.harness.runpair import (
    DEADLINE,
    DELTAS,
    Pair,
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
    Event,
    Reader,
    auth,
    delta_indexes,
    items,
    read_events,
    reply_text,
    seqs,
    thread_of,
)

# On one node and on a Citus cluster (the run log distributed by user_id, docs/citus.md).
SHARED = pytest.mark.backends("owner", "citus-role")


@SHARED
async def test_a_reply_cut_on_a_is_resumed_through_b_and_completes(
    two: Pair, tmp_path: Path
) -> None:
    user = new_user()
    lockstep = Lockstep(tmp_path / "ls")
    async with asyncio.timeout(DEADLINE):
        run_id, first = await start_reply(two.a, user, lockstep, stop_at=2)
        # The connection to A is gone; the reply waits for delta 2's acknowledgement.
        last = first[-1].seq
        assert last is not None and seqs(first) == list(range(1, last + 1))
        async with two.b.stream(
            "GET", f"/chatkit/runs/{run_id}/events", headers=resume_headers(user, run_id, last)
        ) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["x-chatkit-run"] == run_id
            lockstep.ack(2)  # only now may the reply go on: every later delta comes through B
            rest = await read_events(response, lockstep)
    everything = first + rest
    assert_whole_reply(everything, run_id)
    # The detached reply ran to its end (the paced model saw every delta acknowledged) and
    # is stored complete, not cut.
    done = [e for e in everything if e.type == "thread.item.done"]
    assert done[-1].data["item"]["type"] == "assistant_message"
    text = reply_text(done[-1].data["item"])
    assert "timeout" not in text and text.count("[d") == DELTAS
    thread_id = thread_of(everything)
    stored = await items(two.b, user, thread_id)
    assert [i["type"] for i in stored] == ["user_message", "assistant_message"]
    assert reply_text(stored[1]) == text

    # Replayed whole, from any process, until the retention passes.
    for client in (two.a, two.b):
        async with client.stream(
            "GET", f"/chatkit/runs/{run_id}/events?after=0", headers=auth(user)
        ) as response:
            replay = await read_events(response, None)
        assert [e.data for e in replay] == [e.data for e in everything]
        assert seqs(replay) == seqs(everything)


async def test_without_the_opt_in_nothing_changes(two: Pair) -> None:
    user = new_user()
    body = threads_create_body(pace_prompt(2, 0))
    async with two.a.stream("POST", "/chatkit", json=body, headers=auth(user)) as response:
        assert response.status_code == 200
        assert "x-chatkit-run" not in response.headers
        raw = (await response.aread()).decode()
    assert "\nid:" not in "\n" + raw and "data: " in raw


@SHARED
async def test_a_cancel_through_b_stops_the_reply_on_a(two: Pair, tmp_path: Path) -> None:
    user = new_user()
    lockstep = Lockstep(tmp_path / "ls")
    body = threads_create_body(pace_prompt(DELTAS, 0, lockstep=lockstep))
    headers = {**auth(user), **RESUMABLE}
    async with asyncio.timeout(DEADLINE):
        async with two.a.stream("POST", "/chatkit", json=body, headers=headers) as attached:
            run_id = attached.headers["x-chatkit-run"]
            reader = Reader(attached)
            first = await reader.read(lockstep, stop_at_delta=2)
            cancel = await two.b.post(f"/chatkit/runs/{run_id}/cancel", headers=auth(user))
            assert cancel.status_code == 202, cancel.text
            # The stream still attached to A ends (delta 2 is never acknowledged: the reply
            # could not go on by itself).
            rest = await reader.read(lockstep)
    assert delta_indexes(first + rest) == [0, 1, 2]
    assert not [e for e in rest if e.type == "thread.item.done"]
    thread_id = thread_of(first)
    stored = await stored_types(two.dsn, user, thread_id)
    assert [t for t, _ in stored] == ["user_message", "assistant_message", "sdk_hidden_context"]
    assert "[d2@" in stored[1][1] and "[d3@" not in stored[1][1]
    assert "cancelled" in stored[2][1]

    # The run has ended for every reader: a resume through B replays it and ends.
    async with asyncio.timeout(DEADLINE):
        async with two.b.stream(
            "GET", f"/chatkit/runs/{run_id}/events", headers=auth(user)
        ) as response:
            replay = await read_events(response, None)
    assert seqs(replay) == list(range(1, len(replay) + 1))
    assert [e.data for e in replay] == [e.data for e in first + rest]
    # Cancelling again is harmless.
    again = await two.a.post(f"/chatkit/runs/{run_id}/cancel", headers=auth(user))
    assert again.status_code == 202


async def test_another_users_run_answers_like_a_missing_one(two: Pair, tmp_path: Path) -> None:
    owner, other = new_user(), new_user()
    lockstep = Lockstep(tmp_path / "ls")
    async with asyncio.timeout(DEADLINE):
        run_id, _ = await start_reply(two.a, owner, lockstep, stop_at=0)
    missing = "run_" + "0" * 32
    answers = []
    for client in (two.a, two.b):
        for rid in (run_id, missing, "not-a-run"):
            got = await client.get(f"/chatkit/runs/{rid}/events", headers=auth(other))
            answers.append((got.status_code, got.json()["error"]["code"]))
            got = await client.post(f"/chatkit/runs/{rid}/cancel", headers=auth(other))
            answers.append((got.status_code, got.json()["error"]["code"]))
    assert set(answers) == {(404, "not_found")}
    # Without a token: 401, before anything is looked up.
    assert (await two.b.get(f"/chatkit/runs/{run_id}/events")).status_code == 401
    assert (await two.b.post(f"/chatkit/runs/{run_id}/cancel")).status_code == 401
    # The owner's run was not touched: it is cancelled by its owner and ends.
    assert (
        await two.b.post(f"/chatkit/runs/{run_id}/cancel", headers=auth(owner))
    ).status_code == 202
    async with asyncio.timeout(DEADLINE):
        async with two.b.stream(
            "GET", f"/chatkit/runs/{run_id}/events", headers=auth(owner)
        ) as response:
            events = await read_events(response, None)
    assert seqs(events) == list(range(1, len(events) + 1))


@pytest.mark.parametrize(
    ("header", "query"),
    [
        ("garbage", ""),
        ("{run}", ""),
        ("{run}:", ""),
        ("{run}:-1", ""),
        ("{run}:1.5", ""),
        ("{run}:abc", ""),
        ("{run}:99999999999", ""),
        ("{run}:2147483648", ""),
        ("run_" + "1" * 32 + ":3", ""),
        (None, "?after=x"),
        (None, "?after=-3"),
        (None, "?after="),
        (None, "?after=1&after=2"),
    ],
)
async def test_bad_resume_points_are_400s(
    two: Pair, tmp_path: Path, header: str | None, query: str
) -> None:
    user = new_user()
    lockstep = Lockstep(tmp_path / "ls")
    async with asyncio.timeout(DEADLINE):
        run_id, _ = await start_reply(two.a, user, lockstep, stop_at=DELTAS - 1)
        lockstep.ack(DELTAS - 1)
    headers = auth(user)
    if header is not None:
        headers["Last-Event-ID"] = header.format(run=run_id)
    got = await two.b.get(f"/chatkit/runs/{run_id}/events{query}", headers=headers)
    assert got.status_code == 400, got.text
    assert got.json()["error"]["code"] == "invalid_request"


async def test_resume_points_past_the_end_and_expired_runs(two: Pair, tmp_path: Path) -> None:
    user = new_user()
    lockstep = Lockstep(tmp_path / "ls")
    async with asyncio.timeout(DEADLINE):
        run_id, _ = await start_reply(two.a, user, lockstep, stop_at=DELTAS - 1)
        lockstep.ack(DELTAS - 1)
        # Read it to its end (through B, from the log) so it is known to have ended.
        async with two.b.stream(
            "GET", f"/chatkit/runs/{run_id}/events", headers=auth(user)
        ) as response:
            events = await read_events(response, None)
        assert delta_indexes(events) == list(range(DELTAS))
        # Past the end: nothing, and the stream ends at once.
        got = await two.b.get(f"/chatkit/runs/{run_id}/events?after=2147483647", headers=auth(user))
        assert got.status_code == 200 and "data:" not in got.text
    # Older than RUN_EVENTS_RETENTION_SECONDS: as missing.
    conn = await asyncpg.connect(two.dsn)
    try:
        await conn.execute(
            "UPDATE chatkit_runs SET ended_at = now() - interval '1 hour' "
            "WHERE user_id = $1 AND id = $2",
            user,
            run_id,
        )
    finally:
        await conn.close()
    for client in (two.a, two.b):
        assert (
            await client.get(f"/chatkit/runs/{run_id}/events", headers=auth(user))
        ).status_code == 404
        assert (
            await client.post(f"/chatkit/runs/{run_id}/cancel", headers=auth(user))
        ).status_code == 404


async def logged_up_to(dsn: str, user: str, run_id: str, seq: int) -> None:
    """Until the run's log holds event ``seq`` (the lockstep holds the reply, so it comes; the
    deadline only turns a bug into a failure instead of a hang)."""
    conn = await asyncpg.connect(dsn)
    deadline = asyncio.get_running_loop().time() + DEADLINE
    try:
        while True:
            last = await conn.fetchval(
                "SELECT last_seq FROM chatkit_runs WHERE user_id = $1 AND id = $2", user, run_id
            )
            if last is not None and last >= seq:
                return
            assert asyncio.get_running_loop().time() < deadline, (
                f"run {run_id} never logged event {seq} (last {last})"
            )
            await asyncio.sleep(0.02)
    finally:
        await conn.close()


@dataclass
class Held:
    """A reply held at delta 2 on a third process, everything its client saw logged."""

    victim: Backend
    user: str
    run_id: str
    first: list[Event]
    last: int


async def held_on_a_third_process(dsn: str, database_url: str, tmp_path: Path, base: Path) -> Held:
    victim = Backend(database_url=database_url, extra_env=backend_env(tmp_path, base))
    start_all([victim], tmp_path, "victim")
    user = new_user()
    try:
        async with httpx.AsyncClient(base_url=victim.url, timeout=30) as client:
            async with asyncio.timeout(DEADLINE):
                lockstep = Lockstep(tmp_path / "ls")
                run_id, first = await start_reply(client, user, lockstep, stop_at=2)
                last = first[-1].seq
                assert last is not None
                await logged_up_to(dsn, user, run_id, last)
    except BaseException:
        victim.stop()
        raise
    return Held(victim, user, run_id, first, last)


async def test_sigkill_of_the_runs_process_ends_its_resumers_with_one_error(
    two: Pair, database_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A third process runs the reply and is killed mid-reply: resumers through B learn it is
    dead within RUN_DEAD_AFTER_SECONDS of its last write and get one error event, retry
    allowed, after the last event they have; the partial reply is stored with the cancel
    marker. Never a hang."""
    # Killed once everything the client has is logged: what is stored is known.
    held = await held_on_a_third_process(
        two.dsn, database_url, tmp_path, tmp_path_factory.getbasetemp().parent
    )
    victim, user, run_id, first, last = held.victim, held.user, held.run_id, held.first, held.last
    try:
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(DEADLINE)
    finally:
        victim.stop()
    for resume_from in (last, 0):
        async with asyncio.timeout(DEADLINE):
            async with two.b.stream(
                "GET",
                f"/chatkit/runs/{run_id}/events",
                headers=resume_headers(user, run_id, resume_from),
            ) as response:
                assert response.status_code == 200
                rest = await read_events(response, None)
        final = rest[-1]
        assert final.type == "error" and final.data["allow_retry"] is True, final.data
        assert [e.type for e in rest].count("error") == 1
        assert seqs(rest) == list(range(resume_from + 1, last + 2))
        # What the log kept is what the client saw, in the same order, then the error.
        assert [e.data for e in rest[:-1]] == [e.data for e in first[resume_from:]]

    # The partial reply is stored as a disconnect stores it: the deltas the client saw, then
    # the marker; the thread goes on normally after it.
    stored = await stored_types(two.dsn, user, thread_of(first))
    assert [t for t, _ in stored] == ["user_message", "assistant_message", "sdk_hidden_context"]
    assert "[d2@" in stored[1][1] and "[d3@" not in stored[1][1]
    added = next(
        e
        for e in first
        if e.type == "thread.item.added" and e.data["item"]["type"] == "assistant_message"
    )
    assert added.data["item"]["id"] in stored[1][1]
    assert "cancelled" in stored[2][1]


async def test_a_frozen_process_declared_lost_does_not_store_its_reply_again(
    two: Pair, database_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A third process runs the reply and is frozen (SIGSTOP) mid-reply, alive but silent: a
    resumer through B declares the run lost after RUN_DEAD_AFTER_SECONDS and stores what was
    logged. Thawed (SIGCONT), the process learns at its next log write that the run was taken
    over and stops it without storing the partial reply a second time: one assistant message,
    one cancel marker."""
    held = await held_on_a_third_process(
        two.dsn, database_url, tmp_path, tmp_path_factory.getbasetemp().parent
    )
    victim, user, run_id, first, last = held.victim, held.user, held.run_id, held.first, held.last
    try:
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            async with asyncio.timeout(DEADLINE):
                async with two.b.stream(
                    "GET",
                    f"/chatkit/runs/{run_id}/events",
                    headers=resume_headers(user, run_id, last),
                ) as response:
                    assert response.status_code == 200
                    rest = await read_events(response, None)
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        assert [e.type for e in rest] == ["error"], [e.data for e in rest]
        # The thawed process writes its log again (a heartbeat), learns the run is lost and
        # stops it; a graceful stop then waits for whatever it would store.
        async with asyncio.timeout(DEADLINE):
            while "declared lost elsewhere" not in victim.log():
                await asyncio.sleep(0.05)
    finally:
        victim.stop()
    stored = await stored_types(two.dsn, user, thread_of(first))
    assert [t for t, _ in stored] == ["user_message", "assistant_message", "sdk_hidden_context"]
    assert "[d2@" in stored[1][1] and "[d3@" not in stored[1][1]


async def test_prune_deletes_run_logs_past_the_retention(
    engine: AsyncEngine, test_settings: Settings, database_url: str
) -> None:
    """Ended runs past RUN_EVENTS_RETENTION_SECONDS go, and so do runs whose process died
    with nobody resuming them (their heartbeat stopped as long ago); their events with them."""
    user = new_user()
    await prune(engine, test_settings)  # what earlier tests left past the retention
    conn = await asyncpg.connect(PgServer.dsn(database_url))
    try:
        for run in ("run_old_ended", "run_old_silent", "run_recent"):
            await conn.execute("SELECT chatkit_run_start($1, $2, NULL)", user, run)
            await conn.execute(
                "SELECT chatkit_run_append($1, $2, 1, $3::text[], 'running')",
                user,
                run,
                ["data: {}"],
            )
        await conn.execute(
            "UPDATE chatkit_runs SET state = 'completed', ended_at = now() - interval '1 hour' "
            "WHERE user_id = $1 AND id = 'run_old_ended'",
            user,
        )
        await conn.execute(
            "UPDATE chatkit_runs SET heartbeat_at = now() - interval '1 hour' "
            "WHERE user_id = $1 AND id = 'run_old_silent'",
            user,
        )
        dry = await prune(engine, test_settings, dry_run=True)
        assert dry.runs == 2 and "would delete 2 expired run log(s)" in dry.summary()
        report = await prune(engine, test_settings)
        assert report.runs == 2
        left = await conn.fetch(
            "SELECT r.id, count(e.seq) AS n FROM chatkit_runs r LEFT JOIN chatkit_run_events e "
            "ON e.user_id = r.user_id AND e.run_id = r.id WHERE r.user_id = $1 GROUP BY r.id",
            user,
        )
        assert [(r["id"], r["n"]) for r in left] == [("run_recent", 1)]
        orphans = await conn.fetchval(
            "SELECT count(*) FROM chatkit_run_events WHERE user_id = $1", user
        )
        assert orphans == 1
    finally:
        await conn.close()
