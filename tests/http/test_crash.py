"""The service killed with SIGKILL in the middle of writes: after a restart no thread is half
written, and every write a client saw acknowledged is there, unchanged.

Real parts only: the image's command in a child process (uvicorn, uvloop, httptools serving
``app.main:create_app``), its own PostgreSQL database (migrated first, as a deployment does), the offline model streaming its reply word by word, and httpx clients
on loopback. Several users' writers run concurrently (threads.create and
threads.add_user_message streams, uploads carried by messages, items.feedback, threads.update,
threads.delete); at a random moment, while at least one reply is mid-stream, the process gets
SIGKILL; it is started again on the same database and everything is checked (see
``tests/harness/crash.py``); three times (``CRASH_KILLS``), then the restarted service is used
once more. Set ``CRASH_SEED`` to replay a run's choices (not its timing).

What a reply cut by SIGKILL looks like afterwards: the user message (saved before its
``thread.item.done`` was sent) is there; the reply is either missing entirely or, when the kill
fell between its save and the client reading its ``thread.item.done``, complete. Never a
partial reply, and never the SDK's "the user cancelled the stream" marker: no cancellation
handler runs under SIGKILL, so the thread simply ends with an unanswered user message, and the
next message in it gets a normal answer.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.harness.crash import (
    Ledger,
    Pending,
    Round,
    ServiceProcess,
    UnexpectedFailure,
    Writer,
    database_invariants,
    is_complete_reply,
    list_items,
    list_threads,
    verify,
)
from tests.harness.pg import PgServer, migrate

USERS = ["ana", "ben", "chen"]
WRITERS_PER_USER = 3
STREAMERS = 2  # of each user's writers; the others mostly rate, rename and delete
KILLS = int(os.environ.get("CRASH_KILLS", "3"))
FILE_BYTES = 300_000  # two blob chunks


async def populate(service: ServiceProcess, ledger: Ledger, client: httpx.AsyncClient) -> None:
    """Conversations to work on, before the first kill: every writer starts with two threads
    with a complete exchange each."""
    rnd = Round(client, ledger, service.ready_at)
    writers = [
        Writer(rnd, user, i, random.Random(f"{user}{i}"), FILE_BYTES)
        for user in USERS
        for i in range(WRITERS_PER_USER)
    ]

    async def two_threads(writer: Writer) -> None:
        for n in range(2):
            text = f"{writer.user} w{writer.index} opening {n}"
            await writer.perform(Pending("create", writer.user, writer.index, text=text))

    await asyncio.gather(*(two_threads(w) for w in writers))


async def run_until_killed(
    service: ServiceProcess,
    ledger: Ledger,
    rng: random.Random,
    client: httpx.AsyncClient,
    refusals: list[float],
) -> tuple[float, int]:
    """Writers against the live service, then SIGKILL at a random moment while a reply is
    streaming. Returns (seconds after the writers started, replies cut mid-stream)."""
    rnd = Round(client, ledger, service.ready_at)
    writers = [
        Writer(rnd, user, i, random.Random(rng.random()), FILE_BYTES, streams=i < STREAMERS)
        for user in USERS
        for i in range(WRITERS_PER_USER)
    ]
    for writer in writers:
        writer.pause = 0.0 if writer.streams else 0.03
    tasks = [asyncio.create_task(w.run(), name=f"{w.user}/w{w.index}") for w in writers]
    started = time.monotonic()
    await asyncio.sleep(rng.uniform(0.3, 2.5))
    deadline = time.monotonic() + 5
    while not rnd.mid_reply() and time.monotonic() < deadline:
        if any(t.done() for t in tasks):
            break
        await asyncio.sleep(0.002)
    cut = len(rnd.mid_reply())
    offset = time.monotonic() - started
    rnd.killed = True
    service.kill()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    refusals.extend(rnd.refused)
    return offset, cut


async def test_sigkill_mid_writes_loses_no_acknowledged_write(
    pg_server: PgServer, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(2**32))
    print(f"\n[crash] CRASH_SEED={seed}")
    rng = random.Random(seed)
    url = await pg_server.create_database("ckpg_crash")
    await asyncio.to_thread(migrate, url)
    database = str(make_url(url).database)
    # Bytecode kept between sessions (outside the checkout): restarts cost imports only.
    pycache = tmp_path_factory.getbasetemp().parent / "chatkit-pg-crash-pycache"
    service = ServiceProcess(url, tmp_path / "service", pycache)
    ledger = Ledger()
    conn = await asyncpg.connect(PgServer.dsn(url))
    began = time.monotonic()
    try:
        await asyncio.to_thread(service.start)
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            await populate(service, ledger, client)
        kills: list[tuple[float, int]] = []
        refusals: list[float] = []  # 429s met by writers, seconds after the service was ready
        total_checked = 0
        for _ in range(KILLS):
            async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
                kills.append(await run_until_killed(service, ledger, rng, client, refusals))
            in_flight = len(ledger.pending)
            await asyncio.to_thread(service.start)  # the same database, after the crash
            async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
                counts = await database_invariants(conn, database)
                checked = await verify(ledger, client, conn, USERS)
            total_checked += checked.total()
            print(
                f"[crash] killed at {kills[-1][0]:.2f}s with {kills[-1][1]} replies mid-stream "
                f"and {in_flight} writes in flight; checked {checked.total()} acknowledged "
                f"writes; in flight: {dict(checked.pending_resolved)}; rows: {counts}"
            )
            assert kills[-1][1] >= 1, "the kill did not land in the middle of a reply"
            assert in_flight >= 1

        # The restarted service serves the same users: their threads, a conversation whose
        # reply was cut (it goes on normally after the unanswered message), a new thread.
        assert ledger.cut_replies, "no reply was ever cut"
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            rnd = Round(client, ledger, service.ready_at)
            for user in USERS:
                live = {t.id for t in ledger.of(user) if t.live()}
                assert set(await list_threads(client, user)) == live
            continued = 0
            for thread_id, dangling_id in ledger.cut_replies:
                rec = ledger.threads[thread_id]
                if not rec.live() or continued >= len(USERS):
                    continue
                writer = Writer(rnd, rec.user, rec.owner, random.Random(seed), FILE_BYTES)
                before = [i["id"] for i in await list_items(client, rec.user, thread_id)]
                p = Pending(op="message", user=rec.user, writer=rec.owner, thread=rec)
                p.text = f"{rec.user} after the crash: are you there?"
                await writer.perform(p)
                items = await list_items(client, rec.user, thread_id)
                assert [i["id"] for i in items[: len(before)]] == before
                assert dangling_id in before
                assert [i["type"] for i in items[len(before) :]] == [
                    "user_message",
                    "assistant_message",
                ]
                assert is_complete_reply(items[-1])
                continued += 1
            assert continued >= 1, "every thread with a cut reply was deleted"
            for i, user in enumerate(USERS):
                writer = Writer(rnd, user, 100 + i, random.Random(seed), FILE_BYTES)
                await writer.perform(
                    Pending(op="create", user=user, writer=100 + i, text=f"{user} again")
                )
            counts = await database_invariants(conn, database)
            final = await verify(ledger, client, conn, USERS)
            assert not final.pending_resolved
            total_checked += final.total()

        # The checks are not vacuous: one acknowledged item lost, and they say so.
        victim = next(t for t in ledger.threads.values() if t.live() and t.items)
        await conn.execute(
            "DELETE FROM chatkit_items WHERE user_id = $1 AND thread_id = $2 AND id = $3",
            victim.user,
            victim.id,
            next(iter(victim.items)),
        )
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            with pytest.raises(AssertionError, match="acknowledged item lost"):
                await verify(ledger, client, conn, USERS)

        # And it still stops cleanly.
        assert service.stop() in (0, -signal.SIGTERM), service.log()
        saved = sum(ledger.cut_reply_saved)
        print(
            f"[crash] {KILLS} kills; {sum(ledger.acks.values())} acknowledged writes "
            f"{dict(ledger.acks)}; {total_checked} checks of acknowledged state; "
            f"{len(ledger.cut_replies)} replies cut mid-stream: {saved} found saved complete, "
            f"{len(ledger.cut_replies) - saved} missing (thread ends at the user message); "
            f"service starts {[round(s, 1) for s in service.starts]} s; "
            f"{len(refusals)} 429s from stale leases, the last "
            f"{max(refusals, default=0):.1f} s after a restart; "
            f"{time.monotonic() - began:.1f} s in all; final rows {counts}"
        )
        refusals.extend(rnd.refused)
        # A killed process's stream leases count against its users until they lapse: never
        # longer than STREAM_LEASE_SECONDS after the restart (plus this client's retry pace).
        assert all(t <= service.lease_seconds + 2.0 for t in refusals), sorted(refusals)
        assert sum(ledger.acks.values()) >= 50
        assert ledger.acks["item"] >= 20 and ledger.acks["thread"] >= len(USERS)
    except (AssertionError, UnexpectedFailure):
        print(service.log())
        raise
    finally:
        if service.proc is not None and service.proc.poll() is None:
            service.kill()
        await conn.close()
        await pg_server.drop_database(url)
