"""Server-sent events for ChatKit streams: a producer task, heartbeats, disconnects and readers
that stop reading.

The ChatKit stream runs in a *pump* task of its own, not in the request's task. When the
client goes away, the pump is cancelled exactly once, at the await it is blocked on (the model,
a tool, the store), so the SDK's cancellation handler runs in a task that is not inside
Starlette's cancelled scope and its saves can complete. The pump never blocks on the consumer,
so a cancellation always lands inside the SDK's code rather than between two events (blocking
it would not bound memory anyway: the Agents SDK's run keeps reading the model into a queue of
its own, whoever reads its events).

What bounds a stream's memory and time whatever its reader does is a cut, made exactly as a
disconnect is (the partial reply and the SDK's "cancelled" marker are saved):

* the chunks waiting for the client may not exceed ``max_buffered_bytes``
  (``STREAM_BUFFER_BYTES``): a client that reads slower than the model writes, by that much
  beyond what the socket buffers hold, is cut at once;
* one write to the client may not wait longer than ``stall_seconds`` (``STREAM_STALL_SECONDS``):
  a client that stops reading is cut then, even once the reply is complete and saved, so a
  stuck connection holds no stream slot for ever.

A cut response cannot be finished (the last write would wait on the same full socket): it is
left unfinished, and the server closes the connection (uvicorn logs "ASGI callable returned
without completing response" for it; ASGI gives an app no way to abort a connection).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from app.background import TaskRegistry
from app.errors import ServiceUnavailableError

log = logging.getLogger(__name__)

PING = b": ping\n\n"
TIMER_SLACK = 0.002
"""A timer firing this early counts as on time (the event loop rounds its timers)."""
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamCut(Exception):
    """The pump gave up on its reader (``EventPump.cut``): the response must be dropped, never
    ended, whichever of the pump's end and the response's watcher comes first."""


class EventPump:
    """Moves chunks from ``source`` (run in its own task) to the response, adding heartbeats.

    Chunks wait in a buffer of at most ``max_buffered_bytes`` (a single chunk larger than that
    still goes when nothing else waits); one more, and the pump gives up on the reader: the
    buffer is dropped and ``cut`` is set, for the response to end the stream as on a
    disconnect.

    When the source fails, ``error_chunk`` makes the stream's last event; with ``None`` the
    stream is cut instead (the connection dropped, not ended): for a follower of a resumable
    reply, whose clean end means "the reply is over" and whose client resumes after a drop."""

    def __init__(
        self,
        source: AsyncIterable[bytes],
        *,
        tasks: TaskRegistry,
        heartbeat_seconds: float,
        error_chunk: Callable[[BaseException], bytes] | None,
        max_buffered_bytes: int,
    ) -> None:
        self._source = source
        self._tasks = tasks
        self._heartbeat = heartbeat_seconds
        self._error_chunk = error_chunk
        self._max_bytes = max_buffered_bytes
        self._buffer: deque[bytes] = deque()
        self.buffered_bytes = 0
        # Set when something is buffered, or the source has ended, or a heartbeat is due: a
        # bare future rather than an ``asyncio.Event`` (one wake-up per chunk, the cheaper one).
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self.cut = asyncio.Event()  # the reader fell too far behind
        self._task: asyncio.Task[None] | None = None
        self.failed = False
        self.chunks_sent = 0
        self._closing: bytes | None = None  # sent after a cancelled producer (``end_with``)
        # The heartbeat: one timer for the whole stream, moved on only when it fires (a timeout
        # per wait would cost a timer per chunk); ``_idle_since`` is when the current wait began.
        self._idle_since: float | None = None
        self._ping_due = False
        self._beat: asyncio.TimerHandle | None = None

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def end_with(self, closing_chunk: bytes) -> None:
        """Cancel the producer (the SDK stores the partial reply with its cancel marker) and
        end the stream with ``closing_chunk`` (an error event) once it has: shutdown's cut."""
        self._closing = closing_chunk
        if not self.stop():
            self._closing = None

    def start(self) -> None:
        if self._task is None:
            self._task = self._tasks.spawn(self._pump(), name="chatkit-stream")

    def stop(self) -> bool:
        """Cancel the producer if it is still running; True if it had to be cancelled."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            return True
        return False

    def _push(self, chunk: bytes) -> None:
        if self.cut.is_set():
            return  # the reader is being cut: nothing more is kept for it
        if self._buffer and self.buffered_bytes + len(chunk) > self._max_bytes:
            log.warning(
                "stream cut: the client is not reading",
                extra={"reason": "buffer", "buffered_bytes": self.buffered_bytes},
            )
            self._buffer.clear()
            self.buffered_bytes = 0
            self.cut.set()
            return
        self._buffer.append(chunk)
        self.buffered_bytes += len(chunk)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _pump(self) -> None:
        try:
            async for chunk in self._source:
                self._push(chunk)
        except Exception as exc:
            self.failed = True
            if isinstance(exc, ServiceUnavailableError):
                # A database outage: expected now and then, and said without a traceback.
                cause = exc.__cause__
                log.warning(
                    "stream failed: %s",
                    exc.message,
                    extra={"reason": type(cause).__name__ if cause else type(exc).__name__},
                )
            else:
                log.exception("stream failed after the response started")
            if self._error_chunk is None:
                self._buffer.clear()
                self.buffered_bytes = 0
                self.cut.set()
            else:
                self._push(self._error_chunk(exc))
        except asyncio.CancelledError:
            if self._closing is not None:
                self._push(self._closing)
            raise
        finally:
            self._ended = True
            self._wake()

    def _check_beat(self) -> None:
        self._beat = None
        if self._idle_since is None:
            return  # not waiting: the next wait sets the timer again
        loop = asyncio.get_running_loop()
        due = self._idle_since + self._heartbeat
        if loop.time() + TIMER_SLACK < due:
            self._beat = loop.call_at(due, self._check_beat)
            return
        self._ping_due = True
        self._wake()

    async def chunks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self.cut.is_set():
                    raise StreamCut
                if not self._buffer and not self._ended:
                    self._waiter = loop.create_future()
                    self._ping_due = False
                    self._idle_since = loop.time()
                    if self._beat is None:
                        self._beat = loop.call_at(
                            self._idle_since + self._heartbeat, self._check_beat
                        )
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                        self._idle_since = None
                    if self._ping_due and not self._buffer and not self._ended:
                        yield PING  # nothing for ``heartbeat_seconds``
                        continue
                if self._buffer:
                    # Everything already buffered goes out in one write (fewer sends when the
                    # model is faster than the network); at most ``max_buffered_bytes``.
                    batch = b"".join(self._buffer)
                    self.chunks_sent += len(self._buffer)
                    self._buffer.clear()
                    self.buffered_bytes = 0
                    yield batch
                elif self._ended:
                    if self.cut.is_set():
                        raise StreamCut
                    return
        finally:
            if self._beat is not None:
                self._beat.cancel()
                self._beat = None


class SSEResponse(StreamingResponse):
    """Streams an ``EventPump``; always listens for ``http.disconnect`` so an idle stream
    notices a client that left, cuts a client that stops reading (see the module's doc), and
    cancels the producer when the response ends early."""

    def __init__(
        self,
        pump: EventPump,
        *,
        stall_seconds: float,
        on_close: Callable[[str], None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            pump.chunks(),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **(headers or {})},
        )
        self._pump = pump
        self._stall_seconds = stall_seconds
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completed = False
        cut = False
        loop = asyncio.get_running_loop()
        sending_since: float | None = None  # when the write waiting now began
        stall_timer: asyncio.TimerHandle | None = None
        self._pump.start()
        try:
            async with anyio.create_task_group() as tg:

                async def listen_for_disconnect() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            break
                    tg.cancel_scope.cancel()

                async def watch_the_buffer() -> None:
                    nonlocal cut
                    await self._pump.cut.wait()
                    cut = True
                    tg.cancel_scope.cancel()

                # The stall bound: one timer for the whole response, moved on only when it
                # fires (a timeout per write would cost a timer per chunk). A write waits only
                # while the socket is full (the server drains before it writes), so one cut
                # here has written nothing.
                def check_stall() -> None:
                    nonlocal stall_timer, cut
                    stall_timer = None
                    if sending_since is None:
                        return  # no write waiting: the next write sets the timer again
                    due = sending_since + self._stall_seconds
                    if loop.time() + TIMER_SLACK < due:
                        stall_timer = loop.call_at(due, check_stall)
                        return
                    log.warning(
                        "stream cut: the client is not reading",
                        extra={"reason": "stall", "duration_ms": self._stall_seconds * 1000},
                    )
                    cut = True
                    tg.cancel_scope.cancel()

                async def send_or_cut(message: Message) -> None:
                    nonlocal sending_since, stall_timer
                    sending_since = loop.time()
                    if stall_timer is None:
                        stall_timer = loop.call_at(sending_since + self._stall_seconds, check_stall)
                    try:
                        await send(message)
                    finally:
                        sending_since = None

                tg.start_soon(listen_for_disconnect)
                tg.start_soon(watch_the_buffer)
                await self.stream_response(send_or_cut)
                completed = not cut
                tg.cancel_scope.cancel()
        except StreamCut:
            cut = True
        except OSError:
            pass  # the client went away while we were writing
        finally:
            if stall_timer is not None:
                stall_timer.cancel()
            self._pump.stop()
            if self._pump.failed:
                outcome = "error"
            elif cut:
                outcome = "stalled"
            else:
                outcome = "completed" if completed else "disconnected"
            if self._on_close is not None:
                self._on_close(outcome)
