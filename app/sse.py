"""Server-sent events for ChatKit streams: a producer task, heartbeats and disconnects.

The ChatKit stream runs in a *pump* task of its own, not in the request's task. When the
client goes away, the pump is cancelled exactly once, at the await it is blocked on (the model,
a tool, the store), so the SDK's cancellation handler runs in a task that is not inside
Starlette's cancelled scope and its saves can complete. The pump never blocks on the consumer
(the queue is unbounded; a reply is bounded by what the model writes), so a cancellation always
lands inside the SDK's code rather than between two events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .background import TaskRegistry
from .errors import ServiceUnavailableError

log = logging.getLogger(__name__)

PING = b": ping\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_END = object()


class EventPump:
    """Moves chunks from ``source`` (run in its own task) to the response, adding heartbeats."""

    def __init__(
        self,
        source: AsyncIterable[bytes],
        *,
        tasks: TaskRegistry,
        heartbeat_seconds: float,
        error_chunk: Callable[[BaseException], bytes],
    ) -> None:
        self._source = source
        self._tasks = tasks
        self._heartbeat = heartbeat_seconds
        self._error_chunk = error_chunk
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.failed = False
        self.chunks_sent = 0

    def start(self) -> None:
        if self._task is None:
            self._task = self._tasks.spawn(self._pump(), name="chatkit-stream")

    def stop(self) -> bool:
        """Cancel the producer if it is still running; True if it had to be cancelled."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            return True
        return False

    async def _pump(self) -> None:
        try:
            async for chunk in self._source:
                self._queue.put_nowait(chunk)
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
            self._queue.put_nowait(self._error_chunk(exc))
        finally:
            self._queue.put_nowait(_END)

    async def chunks(self) -> AsyncIterator[bytes]:
        getter: asyncio.Future[Any] | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(self._queue.get())
                done, _ = await asyncio.wait({getter}, timeout=self._heartbeat)
                if not done:
                    yield PING
                    continue
                batch = [getter.result()]
                getter = None
                # Everything already queued goes out in one write (fewer sends when the model
                # is faster than the network).
                while not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                end = any(item is _END for item in batch)
                chunks = [item for item in batch if item is not _END]
                if chunks:
                    self.chunks_sent += len(chunks)
                    yield b"".join(chunks)
                if end:
                    return
        finally:
            if getter is not None:
                getter.cancel()


class SSEResponse(StreamingResponse):
    """Streams an ``EventPump``; always listens for ``http.disconnect`` so an idle stream
    notices a client that left, and cancels the producer when the response ends early."""

    def __init__(
        self,
        pump: EventPump,
        *,
        on_close: Callable[[str], None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            pump.chunks(),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **(headers or {})},
        )
        self._pump = pump
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completed = False
        self._pump.start()
        try:
            async with anyio.create_task_group() as tg:

                async def listen_for_disconnect() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            break
                    tg.cancel_scope.cancel()

                tg.start_soon(listen_for_disconnect)
                await self.stream_response(send)
                completed = True
                tg.cancel_scope.cancel()
        except OSError:
            pass  # the client went away while we were writing
        finally:
            self._pump.stop()
            outcome = "error" if self._pump.failed else "completed" if completed else "disconnected"
            if self._on_close is not None:
                self._on_close(outcome)
