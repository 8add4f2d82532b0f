"""A rolling restart's way out (docs/runs.md#rolling-restarts): what this process does between
SIGTERM and its exit.

At SIGTERM uvicorn stops accepting connections (a proxy retries a refused connection on
another replica, a POST included, since nothing was sent) and closes idle keep-alive ones.
The drain starts at the same moment:

* the process refuses new work: ``/readyz`` answers 503 ``draining`` and a ChatKit request or
  a resume that still reaches it (one already on its way in) gets a 503 JSON with
  ``Retry-After``;
* every client following a resumable reply here (the connection that started it, resumers)
  is cut at once, as a dead connection is cut, never ended cleanly (an end means "the reply is
  over"): it resumes through another replica from its last event while the reply runs on
  here to its end, logging its events as before;
* replies without the opt-in go on, their clients attached, for the rest of
  ``SHUTDOWN_GRACE_SECONDS``.

When the grace expires, whatever still runs is stopped as a cancel stops it: the SDK stores
the partial reply with its cancel marker, and each stream ends with one ``error`` event (retry
allowed), after the events its client has. A resumable reply logs that error as its last
event, so its followers anywhere get it and end.

The drain begins at SIGTERM when the app runs under a server that handles it (uvicorn's
handler is chained: ``install``); otherwise (Ctrl+C, an embedding app, tests) it begins when
the lifespan shuts down, after the server has closed its connections.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from app.background import TaskRegistry
from app.chat.runs import RunRegistry
from app.chat.stream_events import error_chunk
from app.errors import ServiceUnavailableError
from app.http.sse import EventPump
from app.observability import Metrics

log = logging.getLogger(__name__)

# What a stream cut at the end of the grace ends with: ChatKit's stream error, retry allowed.
CLOSING_CHUNK = error_chunk(ServiceUnavailableError())
SAVE_SECONDS = 5.0  # after the grace: for the saves the cuts start


class ShuttingDownError(ServiceUnavailableError):
    public_message = "This server is shutting down. Please retry."
    default_retry_after = 1


class Drain:
    """This process's shutdown: the streams and run followers it must end, and when."""

    def __init__(
        self,
        grace_seconds: float,
        tasks: TaskRegistry,
        runs: RunRegistry | None,
        metrics: Metrics,
    ) -> None:
        self.grace_seconds = grace_seconds
        self._tasks = tasks
        self._runs = runs
        self._metrics = metrics
        self.streams: set[EventPump] = set()  # replies streamed without the opt-in
        self.followers: set[EventPump] = set()  # clients following resumable replies
        self.draining = False
        self._deadline = 0.0  # the grace's end (the event loop's clock)
        self._done: asyncio.Task[None] | None = None
        self._restore: Callable[[], None] | None = None

    def follow(self, pump: EventPump) -> None:
        """A client following a resumable reply: cut at SIGTERM (at once if that has come)."""
        self.followers.add(pump)
        if self.draining:
            pump.cut.set()

    def check(self) -> None:
        """Refuse new work once draining (a 503 JSON with ``Retry-After``)."""
        if self.draining:
            raise ShuttingDownError("This server is shutting down.")

    def begin(self) -> None:
        if self.draining:
            return
        self.draining = True
        self._deadline = asyncio.get_running_loop().time() + self.grace_seconds
        self._metrics.draining.set(1)
        runs = self._runs.runs() if self._runs is not None else []
        log.info(
            "shutting down: refusing new work, finishing replies in progress",
            extra={"count": len(self.streams) + len(runs), "duration_ms": self.grace_seconds * 1e3},
        )
        for pump in list(self.followers):
            pump.cut.set()  # its client resumes through another replica
        self._done = self._tasks.spawn(self._finish(), name="shutdown-drain")

    async def _finish(self) -> None:
        loop = asyncio.get_running_loop()
        while (left := self._deadline - loop.time()) > 0:
            going = self._going()
            if not going:
                return
            await asyncio.wait(going, timeout=left)
        pumps = [p for p in self.streams if p.task is not None and not p.task.done()]
        runs = [r for r in self._runs.runs() if not r.driven] if self._runs is not None else []
        if pumps or runs:
            log.warning(
                "shutdown grace over: stopping the replies still running",
                extra={"count": len(pumps) + len(runs)},
            )
        for pump in pumps:
            pump.end_with(CLOSING_CHUNK)
        for run in runs:
            run.stop(CLOSING_CHUNK)

    def _going(self) -> set[asyncio.Task[Any]]:
        tasks: set[asyncio.Task[Any]] = {p.task for p in self.streams if p.task is not None}
        if self._runs is not None:
            tasks |= {r.driver for r in self._runs.runs() if r.driver is not None}
        return {t for t in tasks if not t.done()}

    async def finish(self) -> None:
        """Begin (if SIGTERM has not) and wait for the replies (to their end or the grace's),
        then for every other background task (saves, the run logs' last writes) until the
        grace's end and ``SAVE_SECONDS`` more; what is left then is cancelled."""
        self.begin()
        if self._restore is not None:
            self._restore()
        if self._done is not None:
            await asyncio.wait({self._done})
        left = max(0.0, self._deadline - asyncio.get_running_loop().time())
        await self._tasks.drain(left + SAVE_SECONDS)

    def install(self) -> None:
        """Begin at SIGTERM, then hand the signal on to the server's own handler (uvicorn's:
        it closes the listening socket and waits for the connections). Only when a Python
        handler is there to hand it on to, and only in the main thread (signals' rule)."""
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return
        loop = asyncio.get_running_loop()

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(self.begin)
            previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)

        def restore() -> None:
            if signal.getsignal(signal.SIGTERM) is on_sigterm:
                signal.signal(signal.SIGTERM, previous)

        self._restore = restore
