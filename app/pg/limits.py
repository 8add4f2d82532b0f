"""Per-user limits that hold across every backend process: the state lives in PostgreSQL.

* Requests per minute: the generic cell rate algorithm on one row per user
  (``chatkit_rate_limits.tat``, the theoretical arrival time of the next request). A user may
  send a burst of ``RATE_LIMIT_PER_MINUTE`` requests and then one every ``60 / limit`` seconds.
  Admission is one upsert, whose row lock orders concurrent requests from any process; a
  refused request costs a second statement that computes ``Retry-After``. ``threads.list`` and
  ``items.list``, the commonest requests, do not pay a round trip for it: they read and change
  nothing else, so their admission is deferred (app.pg.admission) and the store runs the same
  upsert as a data-modifying CTE of the statement that reads the page, which it reads only once
  admitted. One statement per list instead of two, and exact as before: the same upsert, under
  the same row lock (held until the page is read, a few more microseconds). Every other
  request is admitted up front, as soon as its type is known; a list request that nothing
  counted (an error before its page, another store, a Citus cluster, whose limiter table is
  the coordinator's own) is admitted after its handler, and a refusal then replaces its answer.
  A message to a thread (``threads.add_user_message``) is admitted by the statement that opens
  its turn, with its thread's load, its stream lease and its run's row (``Limits.begin_turn``,
  migration 0009; docs/runs.md "Round trips of a turn").
* Streams: a reply holds a lease (``chatkit_stream_leases``) while it streams. Leases count
  toward ``MAX_STREAMS_PER_USER`` and claim their thread, so a second message to a thread that
  is still answering (two tabs, a double submit) waits its turn instead of interleaving its
  items with the first reply's. Taking a lease is one call of a SQL function (migration
  0004) that works under a per-user advisory lock; no connection is held while the reply streams. The lease is renewed every
  third of ``STREAM_LEASE_SECONDS`` and deleted when the stream ends; a crashed process's
  leases simply expire.

Every statement sets ``app.user_id`` like the store's do (row-level security, docs/rls.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import asyncpg
from chatkit.store import NotFoundError

from app.background import TaskRegistry
from app.errors import ThreadBusyError, TooManyRequestsError
from app.ids import new_id
from app.pg.admission import PendingAdmission, refused
from app.pg.calls import call, on_citus
from app.pg.pool import ConnectionPool
from app.pg.sql import RATE_WAIT, gated, rate_admit_sql
from app.settings import Settings

log = logging.getLogger(__name__)

# $2: seconds per request (60 / limit); $3: the burst, in seconds (60). A list request runs
# the same upsert folded into its page's statement (app.pg.admission, app.pg.store._page).
SQL_RATE_ADMIT = rate_admit_sql("$2", "$3")
SQL_RATE_WAIT = RATE_WAIT

# Migration 0004's function: under a per-user advisory lock it drops the user's expired leases,
# then answers 'busy' (the thread has a live lease), 'full' (the user is at the limit) or
# 'taken' (the lease was inserted). Not a SQL_ statement for the plan checks of
# tests/pg/test_rls.py: the function sets app.user_id itself before it reads a table (that test
# file also takes leases through a role subject to row-level security).
TAKE_LEASE = "SELECT chatkit_take_stream_lease($1, $2, $3, $4, $5)"
# Migration 0009's function: the turn's admission, its thread's load, its lease and (for a
# resumable reply) its run's row, in one call (``Limits.begin_turn``). Like TAKE_LEASE, it sets
# app.user_id itself before it reads a table.
TURN_BEGIN = (
    "SELECT admitted, wait, thread, lease "
    "FROM chatkit_turn_begin($1, $2, $3, $4, $5, $6, $7, $8, $9)"
)
SQL_LEASE_RENEW = gated(
    "UPDATE chatkit_stream_leases SET expires_at = now() + make_interval(secs => $3::float8) "
    "WHERE user_id = $1 AND id = $2"
)
SQL_LEASE_ATTACH = gated(
    "UPDATE chatkit_stream_leases SET thread_id = $3 WHERE user_id = $1 AND id = $2 "
    "AND thread_id IS NULL"
)
SQL_LEASE_RELEASE = gated("DELETE FROM chatkit_stream_leases WHERE user_id = $1 AND id = $2")

STREAM_RETRY_AFTER_SECONDS = 5
BUSY_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class TurnStart:
    """What ``Limits.begin_turn`` did: the thread's data (the user's; None on a Citus cluster,
    where it was not read), the lease (None: the thread is busy, wait for it with
    ``Limits.lease``) and whether the run's row was written."""

    thread: str | None
    lease: StreamLease | None
    run_started: bool


def _full(limit: int) -> TooManyRequestsError:
    return TooManyRequestsError(
        f"At most {limit} replies may stream at once.", retry_after=STREAM_RETRY_AFTER_SECONDS
    )


class Limits:
    def __init__(self, pool: ConnectionPool, settings: Settings, tasks: TaskRegistry) -> None:
        self.pool = pool
        self.settings = settings
        self.tasks = tasks

    def defer(self, user_id: str) -> PendingAdmission | None:
        """A request's admission, to be counted by ``settle`` or folded into the statement of
        its page (app.pg.admission); None when the rate limit is off."""
        limit = self.settings.rate_limit_per_minute
        return PendingAdmission(user_id, 60.0 / limit, 60.0) if limit > 0 else None

    async def admit(self, user_id: str) -> None:
        """Count a request against the user's budget; ``TooManyRequestsError`` when spent."""
        admission = self.defer(user_id)
        if admission is None:
            return
        args = (user_id, admission.interval, admission.burst)
        async with call(self.pool) as conn:
            if await conn.fetchval(SQL_RATE_ADMIT, *args) is not None:
                return
            wait = await conn.fetchval(SQL_RATE_WAIT, *args)
        raise refused(wait)

    async def settle(self, admission: PendingAdmission | None) -> None:
        """Count a deferred admission that nothing has counted yet, the usual way (once: a
        failure to count is not retried)."""
        if admission is None or admission.consumed:
            return
        admission.consumed = True
        await self.admit(admission.user_id)

    async def lease(self, user_id: str, thread_id: str | None) -> StreamLease:
        """A lease for one streaming reply, waiting up to ``THREAD_BUSY_WAIT_SECONDS`` for the
        thread to be free. Raises ``ThreadBusyError`` or ``TooManyRequestsError``."""
        deadline = time.monotonic() + self.settings.thread_busy_wait_seconds
        while True:
            lease = await self._try_lease(user_id, thread_id)
            if lease is not None:
                return lease
            if time.monotonic() + BUSY_POLL_SECONDS > deadline:
                raise ThreadBusyError()
            await asyncio.sleep(BUSY_POLL_SECONDS)  # holding no connection

    async def _try_lease(self, user_id: str, thread_id: str | None) -> StreamLease | None:
        limit = self.settings.max_streams_per_user
        ttl = self.settings.stream_lease_seconds
        lease_id = new_id("lease")
        async with call(self.pool) as conn:
            outcome = await conn.fetchval(TAKE_LEASE, user_id, lease_id, thread_id, limit, ttl)
        if outcome == "busy":
            return None
        if outcome == "full":
            raise _full(limit)
        return StreamLease(self, user_id, lease_id, thread_id)

    async def begin_turn(
        self,
        admission: PendingAdmission | None,
        user_id: str,
        thread_id: str,
        run_id: str | None,
    ) -> TurnStart:
        """A reply to ``thread_id`` opened in one statement (migration 0009): ``admission``
        counted (unless None or counted already), the thread loaded, the lease taken without
        waiting and, with ``run_id``, the run's row written once the lease is. Raises the 429
        of a refusal, the 404 of a thread that is not the user's, the 429 of a full lease.
        On a Citus cluster the limiter's tables are the coordinator's and the thread and the
        run log are on the user's worker: only the admission and the lease are done (for the
        thread as named: the caller checks it is the user's, and releases the lease if not),
        and the run is not started."""
        pending = admission if admission is not None and not admission.consumed else None
        interval = pending.interval if pending is not None else None
        burst = pending.burst if pending is not None else None
        limit = self.settings.max_streams_per_user
        lease_id = new_id("lease")
        async with call(self.pool) as conn:
            local = not await on_citus(self.pool, conn)
            row = await conn.fetchrow(
                TURN_BEGIN,
                user_id,
                interval,
                burst,
                thread_id,
                lease_id,
                limit,
                self.settings.stream_lease_seconds,
                run_id if local else None,
                local,
            )
        if pending is not None:
            pending.consumed = True
        if not row["admitted"]:
            raise refused(row["wait"])
        if local and row["thread"] is None:
            raise NotFoundError(f"Thread {thread_id} not found")
        if row["lease"] == "full":
            raise _full(limit)
        taken = row["lease"] == "taken"
        lease = StreamLease(self, user_id, lease_id, thread_id) if taken else None
        return TurnStart(row["thread"], lease, taken and local and run_id is not None)


class StreamLease:
    """Held while a reply streams; ``hold`` wraps the stream so the lease lives exactly as long.
    The endpoint hands it to the responder on the request's context (``RequestContext.lease``),
    which ``attach``es a thread the reply has just created."""

    def __init__(self, limits: Limits, user_id: str, lease_id: str, thread_id: str | None) -> None:
        self._limits = limits
        self.user_id = user_id
        self.id = lease_id
        self.thread_id = thread_id

    async def attach(self, thread_id: str) -> None:
        """Claim the thread a ``threads.create`` reply has just made, so that a message sent
        to it from elsewhere (another tab found it in the list) waits for this reply too."""
        if self.thread_id is not None:
            return
        try:
            async with call(self._limits.pool) as conn:
                await conn.execute(SQL_LEASE_ATTACH, self.user_id, self.id, thread_id)
        except asyncpg.UniqueViolationError:
            # A message from elsewhere took the thread first (it saw the thread in the list
            # before this reply claimed it): this reply goes on, that one waited its turn.
            log.warning("stream lease could not claim its new thread")
            return
        self.thread_id = thread_id

    async def _renew_forever(self) -> None:
        ttl = self._limits.settings.stream_lease_seconds
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                async with call(self._limits.pool) as conn:
                    await conn.execute(SQL_LEASE_RENEW, self.user_id, self.id, ttl)
            except Exception as exc:
                # The database is away (or worse); the lease may lapse, which only lifts the
                # limits for this reply. The reply itself goes on.
                log.warning("stream lease not renewed", extra={"reason": type(exc).__name__})

    async def release(self) -> None:
        """Delete the lease; while the database is away, keep trying in the background (the
        user's retry would otherwise find its thread busy until the lease expires)."""
        if not await self._release_once():
            log.warning("stream lease not released; retrying in the background")
            self._limits.tasks.spawn(self._release_later(), name="stream-lease-release-retry")

    async def _release_once(self) -> bool:
        try:
            async with call(self._limits.pool) as conn:
                await conn.execute(SQL_LEASE_RELEASE, self.user_id, self.id)
        except Exception as exc:  # never in the way of the reply or of the error it ends with
            log.debug("stream lease not released yet", extra={"reason": type(exc).__name__})
            return False
        return True

    async def _release_later(self) -> None:
        deadline = time.monotonic() + self._limits.settings.stream_lease_seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(BUSY_POLL_SECONDS)
            if await self._release_once():
                return
        log.warning("stream lease not released (it has expired by itself)")

    async def hold(self, stream: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """``stream``, renewing the lease meanwhile and releasing it when the stream ends
        (completed, failed or cancelled; the release runs to its end even then)."""
        renewer = asyncio.create_task(self._renew_forever(), name="stream-lease-renewal")
        try:
            async for chunk in stream:
                yield chunk
        finally:
            renewer.cancel()
            await asyncio.wait({renewer})  # (a cancellation of ours is not swallowed here)
            release = self._limits.tasks.spawn(self.release(), name="stream-lease-release")
            await asyncio.shield(release)
