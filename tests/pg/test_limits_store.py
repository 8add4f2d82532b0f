"""``app.pg.limits`` against PostgreSQL directly: budgets, leases, their races and their expiry.

The HTTP side (429s, two backend processes, two tabs) is in tests/http/test_limits.py.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from app.background import TaskRegistry
from app.errors import ThreadBusyError, TooManyRequestsError
from app.pg.limits import Limits, StreamLease
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness.pg import PgServer


def _limits(store: PostgresStore, settings: Settings, **overrides: object) -> Limits:
    return Limits(store, settings.model_copy(update=overrides), TaskRegistry())


async def _leases(store: PostgresStore) -> list[tuple[str, str | None]]:
    async with store.pool.acquire() as raw:
        rows = await raw.fetch(
            "SELECT user_id, thread_id FROM chatkit_stream_leases ORDER BY created_at"
        )
    return [(r[0], r[1]) for r in rows]


async def test_concurrent_requests_get_exactly_the_budget(
    store: PostgresStore, test_settings: Settings
) -> None:
    limits = _limits(store, test_settings, rate_limit_per_minute=20)
    outcomes = await asyncio.gather(
        *(limits.admit("alice") for _ in range(45)), return_exceptions=True
    )
    refused = [o for o in outcomes if isinstance(o, TooManyRequestsError)]
    assert len(refused) == 25 and outcomes.count(None) == 20
    # The next slot opens after 60/20 = 3 s; the answer rounds up, never to 0.
    assert {r.retry_after for r in refused} <= {1, 2, 3}
    await limits.admit("bob")  # another user's budget is untouched


async def test_the_budget_refills_at_the_steady_rate(
    store: PostgresStore, test_settings: Settings
) -> None:
    limits = _limits(store, test_settings, rate_limit_per_minute=6)  # then one per 10 s
    for _ in range(6):
        await limits.admit("alice")
    with pytest.raises(TooManyRequestsError) as refused:
        await limits.admit("alice")
    assert 9 <= refused.value.retry_after <= 10
    # Ten seconds pass (moved on the row rather than slept): exactly one more is admitted.
    async with store.pool.acquire() as raw:
        await raw.execute("UPDATE chatkit_rate_limits SET tat = tat - interval '10 seconds'")
    await limits.admit("alice")
    with pytest.raises(TooManyRequestsError):
        await limits.admit("alice")


async def test_zero_turns_the_rate_limit_off(store: PostgresStore, test_settings: Settings) -> None:
    limits = _limits(store, test_settings, rate_limit_per_minute=0)
    for _ in range(50):
        await limits.admit("alice")
    async with store.pool.acquire() as raw:
        assert await raw.fetchval("SELECT count(*) FROM chatkit_rate_limits") == 0


async def test_stream_count_and_thread_claims(
    store: PostgresStore, test_settings: Settings
) -> None:
    limits = _limits(store, test_settings, max_streams_per_user=2, thread_busy_wait_seconds=0)
    first = await limits.lease("alice", "thr_1")
    with pytest.raises(ThreadBusyError):
        await limits.lease("alice", "thr_1")
    second = await limits.lease("alice", None)  # a new thread
    with pytest.raises(TooManyRequestsError) as refused:
        await limits.lease("alice", "thr_2")
    assert refused.value.retry_after >= 1
    other = await limits.lease("bob", "thr_1")  # bob's thr_1 is another thread
    await first.release()
    third = await limits.lease("alice", "thr_1")
    assert sorted(await _leases(store), key=str) == sorted(
        [("alice", None), ("bob", "thr_1"), ("alice", "thr_1")], key=str
    )
    for lease in (second, other, third):
        await lease.release()
    assert await _leases(store) == []


async def test_concurrent_takers_never_exceed_the_count(
    store: PostgresStore, test_settings: Settings
) -> None:
    limits = _limits(store, test_settings, max_streams_per_user=3, thread_busy_wait_seconds=0)
    outcomes = await asyncio.gather(
        *(limits.lease("alice", f"thr_{n}") for n in range(12)), return_exceptions=True
    )
    taken = [o for o in outcomes if isinstance(o, StreamLease)]
    assert len(taken) == 3
    assert all(isinstance(o, StreamLease | TooManyRequestsError) for o in outcomes)
    same_thread = await asyncio.gather(
        *(limits.lease("bob", "thr_x") for _ in range(8)), return_exceptions=True
    )
    assert sum(isinstance(o, StreamLease) for o in same_thread) == 1
    assert sum(isinstance(o, ThreadBusyError) for o in same_thread) == 7


async def test_a_busy_thread_waits_its_turn(store: PostgresStore, test_settings: Settings) -> None:
    limits = _limits(store, test_settings, thread_busy_wait_seconds=5)
    first = await limits.lease("alice", "thr_1")
    waiting = asyncio.create_task(limits.lease("alice", "thr_1"))
    await asyncio.sleep(0.6)
    assert not waiting.done()
    assert store.pool.in_use == 0  # waiting holds no connection
    await first.release()
    second = await asyncio.wait_for(waiting, 2)
    assert await _leases(store) == [("alice", "thr_1")]
    await second.release()


async def test_a_new_threads_reply_claims_its_thread(
    store: PostgresStore, test_settings: Settings
) -> None:
    limits = _limits(store, test_settings, thread_busy_wait_seconds=0)
    lease = await limits.lease("alice", None)
    await lease.attach("thr_new")
    with pytest.raises(ThreadBusyError):
        await limits.lease("alice", "thr_new")
    await lease.attach("thr_other")  # a lease claims one thread, once
    assert await _leases(store) == [("alice", "thr_new")]
    await lease.release()


async def test_leases_of_a_crashed_process_expire(
    store: PostgresStore, test_settings: Settings
) -> None:
    limits = _limits(store, test_settings, thread_busy_wait_seconds=0, max_streams_per_user=1)
    await limits.lease("alice", "thr_1")  # never released: its process "died"
    async with store.pool.acquire() as raw:
        await raw.execute(
            "UPDATE chatkit_stream_leases SET expires_at = now() - $1::interval",
            timedelta(seconds=1),
        )
    lease = await limits.lease("alice", "thr_1")
    assert await _leases(store) == [("alice", "thr_1")]
    await lease.release()


async def test_holding_renews_and_always_releases(
    store: PostgresStore, test_settings: Settings
) -> None:
    limits = _limits(store, test_settings, stream_lease_seconds=3)
    lease = await limits.lease("alice", "thr_1")

    async def expiry() -> float:
        async with store.pool.acquire() as raw:
            value = await raw.fetchval(
                "SELECT extract(epoch FROM expires_at - now()) FROM chatkit_stream_leases"
            )
        return float(value)

    async def slow_stream() -> object:
        for n in range(3):
            await asyncio.sleep(0.8)
            yield f"chunk {n}".encode()
        raise RuntimeError("the reply failed")

    chunks = []
    with pytest.raises(RuntimeError):
        async for chunk in lease.hold(slow_stream()):  # type: ignore[arg-type]
            chunks.append(chunk)
            if len(chunks) == 2:
                # renewed at 1 s (a third of 3 s): more than 3 - 1.6 s left
                assert await expiry() > 2.0
    assert len(chunks) == 3
    await asyncio.sleep(0.1)  # the release runs in a task of its own
    assert await _leases(store) == []


async def test_a_claim_that_loses_the_race_leaves_the_reply_going(
    store: PostgresStore, test_settings: Settings
) -> None:
    """Another tab took the new thread first (it found it in the list before the reply
    claimed it): the claim gives way instead of failing the reply."""
    limits = _limits(store, test_settings, thread_busy_wait_seconds=0)
    creating = await limits.lease("alice", None)
    other_tab = await limits.lease("alice", "thr_new")
    await creating.attach("thr_new")  # no UniqueViolationError
    assert creating.thread_id is None
    assert sorted(await _leases(store), key=str) == sorted(
        [("alice", None), ("alice", "thr_new")], key=str
    )
    await other_tab.release()
    await creating.release()


async def test_a_lease_racing_an_uncommitted_claim_is_busy_not_an_error(
    store: PostgresStore, test_settings: Settings, database_url: str
) -> None:
    """The claim (an UPDATE outside the per-user lock) is in flight when a lease for the same
    thread is taken: the lease waits for it and then answers busy."""
    limits = _limits(store, test_settings, thread_busy_wait_seconds=0)
    owner = await asyncpg.connect(PgServer.dsn(database_url))
    try:
        claim = owner.transaction()
        await claim.start()
        await owner.execute(
            "INSERT INTO chatkit_stream_leases (user_id, id, thread_id, expires_at) "
            "VALUES ('alice', 'lease_claim', 'thr_new', now() + interval '30 seconds')"
        )
        racing = asyncio.create_task(limits.lease("alice", "thr_new"))
        await asyncio.sleep(0.3)
        assert not racing.done()  # waiting on the uncommitted row
        await claim.commit()
        with pytest.raises(ThreadBusyError):
            await asyncio.wait_for(racing, 5)
    finally:
        await owner.close()
    assert await _leases(store) == [("alice", "thr_new")]
