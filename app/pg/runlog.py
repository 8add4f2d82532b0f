"""The run log's statements (migration 0006): a resumable reply's state and events in PostgreSQL.

Each call is one round trip: a SQL function of the migration that sets ``app.user_id`` itself
before it reads a table (row-level security, docs/rls.md), as the stream lease's does. The
process running a reply calls ``start`` once and ``append`` once per batch of events (and as a
heartbeat when it has none); resumers in any process call ``read``; ``cancel`` and ``abandon``
are what ``POST .../cancel`` and a resumer that finds the run's process silent call;
``of_thread`` is what a reloaded page asks (migration 0008), ``set_thread`` how a
``threads.create`` run learns its new thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.pg.calls import Call
from app.pg.pool import ConnectionPool

RUN_START = "SELECT chatkit_run_start($1, $2, $3)"
RUN_OPEN = "SELECT chatkit_run_open($1, $2, $3)"
RUN_APPEND = "SELECT chatkit_run_append($1, $2, $3, $4::text[], $5)"
RUN_READ = "SELECT state, last_seq, age, seq, data FROM chatkit_run_read($1, $2, $3, $4, $5)"
RUN_CANCEL = "SELECT chatkit_run_cancel($1, $2, $3)"
RUN_ABANDON = "SELECT chatkit_run_abandon($1, $2, $3)"
RUN_OF_THREAD = "SELECT id, last_seq FROM chatkit_run_of_thread($1, $2)"  # migration 0008
RUN_SET_THREAD = "SELECT chatkit_run_set_thread($1, $2, $3)"

RUNNING = "running"
COMPLETED = "completed"
CANCELLED = "cancelled"
FAILED = "failed"
LOST = "lost"


@dataclass(frozen=True)
class RunPage:
    """What a resumer read: the run's state, its last logged seq, how many seconds ago its
    process last wrote, and the events after the resumer's seq (in order, as ``(seq, data)``)."""

    state: str
    last_seq: int
    silent_seconds: float
    events: list[tuple[int, str]]

    @property
    def ended(self) -> bool:
        return self.state != RUNNING


class RunLog:
    """The run log over a pool; driver failures come out as the app's errors (503, 400).

    Its steady traffic, each running reply's batches (``append``) and each resumer's polls
    (``read``), may go through a pool of its own (``log_pool``, RUN_LOG_POOL_SIZE): sharing the
    app's pool, a reply from a slow model makes one append per delta, and at hundreds of
    replies the appends queued before the requests' statements (a turn's first event among
    them). In a small pool of their own they queue among themselves, and a reply's events wait
    in memory meanwhile, so each append carries more of them: the log's load limits itself. The
    calls on a request's path (``start``, ``open``, ``cancel``...) stay on the app's pool."""

    def __init__(
        self,
        pool: ConnectionPool,
        *,
        retention_seconds: float,
        log_pool: ConnectionPool | None = None,
    ) -> None:
        self.pool = pool
        self.log_pool = log_pool or pool
        self.retention_seconds = retention_seconds

    async def start(self, user_id: str, run_id: str, thread_id: str | None) -> None:
        async with Call(self.pool) as conn:
            await conn.execute(RUN_START, user_id, run_id, thread_id)

    async def open(self, user_id: str, run_id: str, thread_id: str) -> str | None:
        """``start`` for a message to ``thread_id``, the thread read in the same call (migration
        0009; on a Citus cluster, where the turn's first statement cannot read it): its data,
        or None, and no run, when it is not the user's."""
        async with Call(self.pool) as conn:
            data = await conn.fetchval(RUN_OPEN, user_id, run_id, thread_id)
        return None if data is None else str(data)

    async def append(
        self, user_id: str, run_id: str, first_seq: int, events: Sequence[str], state: str
    ) -> bool | None:
        """Log ``events`` (numbered from ``first_seq``) and set the run's state: whether a
        cancel was asked for, or None when the run is no longer this process's to write."""
        async with Call(self.log_pool) as conn:
            answer = await conn.fetchval(RUN_APPEND, user_id, run_id, first_seq, events, state)
        return None if answer is None else bool(answer)

    async def read(self, user_id: str, run_id: str, after: int, limit: int) -> RunPage | None:
        """The run's events after ``after``; None when it is not this user's, or expired."""
        async with Call(self.log_pool) as conn:
            rows = await conn.fetch(RUN_READ, user_id, run_id, after, limit, self.retention_seconds)
        if not rows:
            return None
        first = rows[0]
        events = [(row["seq"], row["data"]) for row in rows if row["seq"] is not None]
        return RunPage(first["state"], first["last_seq"], float(first["age"]), events)

    async def cancel(self, user_id: str, run_id: str) -> str | None:
        """Ask the run to stop; its state, or None when it is not this user's (or expired)."""
        async with Call(self.pool) as conn:
            state = await conn.fetchval(RUN_CANCEL, user_id, run_id, self.retention_seconds)
        return None if state is None else str(state)

    async def abandon(self, user_id: str, run_id: str, dead_after: float) -> bool:
        """Declare a run whose process is silent for ``dead_after`` seconds lost; whether this
        call did (False: it was not silent, not running, or someone else did first)."""
        async with Call(self.pool) as conn:
            return bool(await conn.fetchval(RUN_ABANDON, user_id, run_id, dead_after))

    async def of_thread(self, user_id: str, thread_id: str) -> tuple[str, int] | None:
        """The running run of the user's thread and its last logged seq; None when there is
        none (or the thread is another user's)."""
        async with Call(self.pool) as conn:
            row = await conn.fetchrow(RUN_OF_THREAD, user_id, thread_id)
        return None if row is None else (str(row["id"]), int(row["last_seq"]))

    async def set_thread(self, user_id: str, run_id: str, thread_id: str) -> None:
        """Record the thread a ``threads.create`` run has just made (a run that has one keeps
        it)."""
        async with Call(self.pool) as conn:
            await conn.execute(RUN_SET_THREAD, user_id, run_id, thread_id)
