"""Resumable replies (docs/runs.md): a reply detached from its connection, its events logged in
PostgreSQL in batches, followed from memory in the process running it and from the log anywhere.

A ``Run`` drives the reply's stream in a task of its own (in the process's task registry, which
shutdown waits for), so the client going away stops only its reading, never the reply. Every
event gets the next sequence number (from 1, without gaps) and waits in memory; a second task,
the *logger*, writes what waits in one call of ``chatkit_run_append`` once ``flush_events`` are
waiting or ``flush_seconds`` after the first of them, never once per delta. The same call is
the run's heartbeat (made every ``heartbeat_seconds`` even when nothing is waiting) and reads
back whether anyone, in any process, asked for a cancel: the driver is then cancelled exactly
as a disconnect cancels an un-opted stream, so the SDK stores the partial reply with its
"cancelled" marker. If the call finds the run no longer running (a resumer declared it lost
while this process was silent), the run stops too.

Followers: in the run's own process, ``Run.follow`` reads the events from memory as they come;
elsewhere (or once the run has left memory, everything logged) ``follow_log`` reads the log,
polling every ``poll_seconds`` while the run is running. A run whose process has written
nothing for ``dead_after_seconds`` is declared lost by the first follower to notice; every
follower of a lost run ends with one ``error`` event (retry allowed) numbered after the last
event it has. It is not logged: the dead process may have sent events it had not logged yet,
and a client that has them must get the error after them, not under a number it has seen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from chatkit.errors import ErrorCode
from chatkit.types import ErrorEvent

from app.background import TaskRegistry
from app.context import RunClaim
from app.ids import new_id
from app.observability import Metrics
from app.pg.runlog import CANCELLED, COMPLETED, FAILED, LOST, RUNNING, RunLog, RunPage

log = logging.getLogger(__name__)

READ_PAGE = 500  # events per read of the log
LOST_EVENT = "data: " + ErrorEvent(code=ErrorCode.STREAM_ERROR, allow_retry=True).model_dump_json(
    by_alias=True, exclude_none=True
)


@dataclass(frozen=True)
class RunOptions:
    flush_seconds: float = 0.1
    flush_events: int = 64
    heartbeat_seconds: float = 1.0
    dead_after_seconds: float = 5.0
    poll_seconds: float = 0.1
    max_seconds: float = 900.0


def frames(run_id: str, first_seq: int, blocks: Sequence[bytes]) -> bytes:
    """Events numbered from ``first_seq``, as one chunk (one write for all that waited)."""
    prefix = b"id: " + run_id.encode() + b":"
    return b"".join(
        prefix + str(first_seq + i).encode() + b"\n" + block + b"\n\n"
        for i, block in enumerate(blocks)
    )


def frame(run_id: str, seq: int, block: str) -> bytes:
    """One SSE event as sent: its ``id:`` line, then its own lines."""
    return f"id: {run_id}:{seq}\n{block}\n\n".encode()


def split_events(chunk: bytes) -> list[bytes]:
    """The SSE events of a chunk of the SDK's stream (each ``data: ...`` block)."""
    return [b for b in chunk.split(b"\n\n") if b.strip()]


def as_text(blocks: Sequence[bytes]) -> list[str]:
    """Blocks as the log stores them, decoded in one go (a block of JSON holds no NUL)."""
    return b"\x00".join(blocks).decode().split("\x00") if blocks else []


class Run:
    """One resumable reply running in this process."""

    def __init__(
        self,
        registry: RunRegistry,
        run_id: str,
        user_id: str,
        source: AsyncIterable[bytes],
        error_chunk: Callable[[BaseException], bytes],
        on_end: Callable[[str], None] | None = None,
        claim: RunClaim | None = None,
    ) -> None:
        self.registry = registry
        self.id = run_id
        self.user_id = user_id
        self.claim = claim  # on the reply's context: marked when another process took it over
        self._source = source
        self._error_chunk = error_chunk
        self._on_end = on_end
        self.events: list[bytes] = []
        self.logged = 0  # events written to the log
        self.state = RUNNING  # the driver's outcome, once it has ended
        self.driven = False  # the driver has ended
        self._changed = asyncio.Event()  # for followers: a new event, or the end
        self._waiting = asyncio.Event()  # for the logger: something to write
        self._driver: asyncio.Task[None] | None = None
        self.cancel_requested = False
        self.lost = False  # declared lost by a resumer while this process was silent
        self._closing: bytes | None = None  # the event ending a run stopped at shutdown
        self.followers = 0  # clients of this process reading it now (the metrics' "detached")

    @property
    def driver(self) -> asyncio.Task[None] | None:
        return self._driver

    def start(self, tasks: TaskRegistry) -> None:
        self._driver = tasks.spawn(self._drive(), name="chatkit-run")
        tasks.spawn(self._log_forever(), name="chatkit-run-log")

    def cancel(self) -> None:
        """Stop the reply (the SDK stores the partial reply with its cancel marker)."""
        self.cancel_requested = True
        if self._driver is not None and not self._driver.done():
            self._driver.cancel()

    def stop(self, closing_chunk: bytes) -> None:
        """Cancel the reply as ``cancel`` does and end it with ``closing_chunk`` (an error
        event), logged after the last event: a run cut by the end of the shutdown grace."""
        self._closing = closing_chunk
        self.cancel()

    def _add(self, block: bytes) -> None:
        self.events.append(block)
        self._changed.set()
        self._waiting.set()

    async def _drive(self) -> None:
        options = self.registry.options
        try:
            async with asyncio.timeout(options.max_seconds):
                async for chunk in self._source:
                    for block in split_events(chunk):
                        self._add(block)
            self.state = COMPLETED
        except asyncio.CancelledError:
            self.state = CANCELLED
            for block in split_events(self._closing or b""):
                self._add(block)
        except TimeoutError:  # RUN_MAX_SECONDS: the reply was cut as a disconnect cuts it
            log.warning("resumable reply stopped at its time limit")
            self.state = CANCELLED
        except Exception as exc:
            log.exception("resumable reply failed")
            for block in split_events(self._error_chunk(exc)):
                self._add(block)
            self.state = FAILED
        finally:
            self.driven = True
            self._changed.set()
            self._waiting.set()
            self.registry.ended(self.state)
            if self._on_end is not None:
                self._on_end(self.state)

    async def _log_forever(self) -> None:
        """Write the waiting events in batches (and heartbeats) until the run is logged to
        its end; then leave the registry (followers read the log from then on)."""
        options = self.registry.options
        failing_since: float | None = None
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.driven and len(self.events) == self.logged:
                    self._waiting.clear()
                    try:
                        async with asyncio.timeout(options.heartbeat_seconds):
                            await self._waiting.wait()
                    except TimeoutError:
                        pass  # a heartbeat
                if not self.driven and len(self.events) - self.logged < options.flush_events:
                    await asyncio.sleep(options.flush_seconds)  # the batch window
                driven = self.driven  # read before the batch: its events are all in it
                batch = self.events[self.logged :]
                state = self.state if driven else RUNNING
                try:
                    answer = await self.registry.runlog.append(
                        self.user_id, self.id, self.logged + 1, as_text(batch), state
                    )
                except Exception as exc:
                    failing_since = failing_since or loop.time()
                    log.warning("run log not written", extra={"reason": type(exc).__name__})
                    if driven and loop.time() - failing_since > options.dead_after_seconds:
                        return  # resumers will find it silent and end it for everyone
                    await asyncio.sleep(options.flush_seconds)
                    continue
                failing_since = None
                self.registry.logged(len(batch))
                self.logged += len(batch)
                if answer is None:
                    log.warning("resumable reply declared lost elsewhere; stopping it")
                    self.lost = True
                    if self.claim is not None:
                        self.claim.taken_over = True  # stored there: not again here
                    self.cancel()
                    return
                if answer and not self.cancel_requested:
                    self.cancel()
                if driven:
                    return
        finally:
            self.registry.forget(self)

    async def follow(self, after: int) -> AsyncIterator[bytes]:
        """The events after seq ``after``, then each as it comes, until the reply ends."""
        seq = after
        self.followers += 1
        try:
            while True:
                while seq < len(self.events):  # checked again after each yield (an await)
                    waiting = self.events[seq:]
                    yield frames(self.id, seq + 1, waiting)
                    seq += len(waiting)
                if self.driven:
                    if self.lost:  # as followers elsewhere end it (``follow_log``)
                        yield frame(self.id, seq + 1, LOST_EVENT)
                    return
                self._changed.clear()
                await self._changed.wait()
        finally:
            self.followers -= 1


class RunRegistry:
    """This process's runs, and how every process reads the log."""

    def __init__(
        self,
        runlog: RunLog,
        tasks: TaskRegistry,
        options: RunOptions,
        on_lost: Callable[[str, Sequence[str]], Awaitable[None]] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.runlog = runlog
        self.tasks = tasks
        self.options = options
        # Stores what a lost run had streamed (app.chat.run_recovery): the user and the events.
        self.on_lost = on_lost
        self._runs: dict[str, Run] = {}
        self.metrics = metrics or Metrics()
        self.metrics.runs_running.set_function(self.running)
        self.metrics.runs_detached.set_function(self.detached)

    def __len__(self) -> int:
        return len(self._runs)

    def running(self) -> int:
        """Runs of this process whose reply is still going (not those only logging the end)."""
        return sum(1 for run in self._runs.values() if not run.driven)

    def detached(self) -> int:
        """Running ones that no client of this process follows (one elsewhere may)."""
        return sum(1 for run in self._runs.values() if not run.driven and not run.followers)

    def runs(self) -> list[Run]:
        return list(self._runs.values())

    def ended(self, state: str) -> None:
        self.metrics.runs_ended.labels(state).inc()

    def logged(self, events: int) -> None:
        self.metrics.run_log_batch_events.observe(events)

    async def create(self, user_id: str, thread_id: str | None) -> str:
        """A new run's id, its row written (so it can be resumed or cancelled at once)."""
        run_id = new_id("run")
        await self.runlog.start(user_id, run_id, thread_id)
        return run_id

    def launch(
        self,
        run_id: str,
        user_id: str,
        source: AsyncIterable[bytes],
        error_chunk: Callable[[BaseException], bytes],
        on_end: Callable[[str], None] | None = None,
        claim: RunClaim | None = None,
    ) -> Run:
        run = Run(self, run_id, user_id, source, error_chunk, on_end, claim)
        self._runs[run_id] = run
        run.start(self.tasks)
        return run

    def forget(self, run: Run) -> None:
        if self._runs.get(run.id) is run:
            del self._runs[run.id]

    def local(self, user_id: str, run_id: str) -> Run | None:
        run = self._runs.get(run_id)
        return run if run is not None and run.user_id == user_id else None

    async def cancel(self, user_id: str, run_id: str) -> bool:
        """Stop the run wherever it runs; False when it is not this user's (or expired)."""
        run = self.local(user_id, run_id)
        if run is not None:
            run.cancel()
        state = await self.runlog.cancel(user_id, run_id)
        return run is not None or state is not None

    async def open(self, user_id: str, run_id: str, after: int) -> AsyncIterator[bytes] | None:
        """The events after ``after`` and then live, or None when the run is not this user's
        (or ended longer ago than the retention). Decided before any response starts."""
        run = self.local(user_id, run_id)
        if run is not None:
            self.metrics.run_resumes.labels("local").inc()
            return run.follow(after)
        page = await self.runlog.read(user_id, run_id, after, READ_PAGE)
        if page is None:
            return None
        self.metrics.run_resumes.labels("log").inc()
        return self.follow_log(user_id, run_id, after, page)

    async def follow_log(
        self, user_id: str, run_id: str, after: int, page: RunPage
    ) -> AsyncIterator[bytes]:
        options = self.options
        seq = after
        while True:
            for number, data in page.events:
                if number == seq + 1:  # never a gap nor a repeat, whatever the reads return
                    seq = number
                    yield frame(run_id, seq, data)
            caught_up = seq >= page.last_seq
            if page.state == LOST and caught_up:
                yield frame(run_id, seq + 1, LOST_EVENT)
                return
            if page.ended and caught_up:
                return
            if not page.ended and caught_up and page.silent_seconds > options.dead_after_seconds:
                if await self.runlog.abandon(user_id, run_id, options.dead_after_seconds):
                    log.warning("resumable reply declared lost: its process went silent")
                    self.ended(LOST)
                    await self._recover(user_id, run_id)
            elif caught_up:
                await asyncio.sleep(options.poll_seconds)
            read = await self.runlog.read(user_id, run_id, seq, READ_PAGE)
            if read is None:
                return  # expired meanwhile
            page = read

    async def _recover(self, user_id: str, run_id: str) -> None:
        """Hand a lost run's logged events to ``on_lost`` (once: only the follower that
        declared the run lost calls this), before any follower learns the run is over, so a
        client that reloads on the error finds the partial reply stored."""
        if self.on_lost is None:
            return
        blocks: list[str] = []
        try:
            while True:
                page = await self.runlog.read(user_id, run_id, len(blocks), READ_PAGE)
                if page is None or not page.events:
                    break
                blocks += [data for _, data in page.events]
            await self.on_lost(user_id, blocks)
        except Exception:
            log.exception("the partial reply of a lost run was not stored")
