"""``GET {CHATKIT_PATH}/threads/{thread_id}/run`` (docs/runs.md): which run is going in a thread,
what a reloaded page asks (frontend/src/runs/thread.ts). Across two real uvicorn processes on
one database (tests/harness/runpair.py), on one node and on a Citus cluster (the route's
functions delegated to the user's worker): a ``threads.create`` reply started on A is found
through B by its new thread while it runs (the run's row learned the thread from its first
event), with the last logged seq; once it ends, and for anyone else, the answer is the same 404.
The reply is held in lockstep (tests/harness/pacedmodel.py), so "while it runs" needs no timing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.harness.deploy import Lockstep
from tests.harness.runpair import DEADLINE, Pair, new_user, start_reply
from tests.harness.runs import auth, read_events, seqs, thread_of

pytestmark = pytest.mark.backends("owner", "citus-role")


async def test_a_running_reply_is_found_by_its_thread_until_it_ends(
    two: Pair, tmp_path: Path
) -> None:
    owner, other = new_user(), new_user()
    lockstep = Lockstep(tmp_path / "ls")
    async with asyncio.timeout(DEADLINE):
        run_id, first = await start_reply(two.a, owner, lockstep, stop_at=2)
        thread_id = thread_of(first)
        got = await two.b.get(f"/chatkit/threads/{thread_id}/run", headers=auth(owner))
        assert got.status_code == 200, got.text
        assert got.json()["run_id"] == run_id
        # What is logged so far, never more than the client has seen (delta 2 is held).
        assert 0 <= got.json()["seq"] <= (seqs(first)[-1])
        assert got.headers["cache-control"] == "no-store"

        # Another user, a missing thread, a malformed id: the same 404; no token: 401.
        answers = set()
        for client in (two.a, two.b):
            for user, tid in ((other, thread_id), (owner, "thr_missing"), (owner, "x" * 129)):
                r = await client.get(f"/chatkit/threads/{tid}/run", headers=auth(user))
                answers.add((r.status_code, r.json()["error"]["code"]))
        assert answers == {(404, "not_found")}
        assert (await two.b.get(f"/chatkit/threads/{thread_id}/run")).status_code == 401

        # The reply goes on to its end (followed through B): then no run is going.
        async with two.b.stream(
            "GET",
            f"/chatkit/runs/{run_id}/events",
            headers={**auth(owner), "Last-Event-ID": f"{run_id}:{seqs(first)[-1]}"},
        ) as response:
            lockstep.ack(2)
            rest = await read_events(response, lockstep)
    assert seqs(first + rest) == list(range(1, len(first) + len(rest) + 1))
    assert any(e.type == "thread.item.done" for e in rest)
    ended = await two.a.get(f"/chatkit/threads/{thread_id}/run", headers=auth(owner))
    assert (ended.status_code, ended.json()["error"]["code"]) == (404, "not_found")
