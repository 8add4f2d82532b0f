"""One reply's Agents SDK run, read by ChatKit's ``stream_agent_response``: paced to its
reader, and ended without leaving tasks behind when the reply is cut.

Paced. The Agents SDK reads the model's stream into a queue of its own (unbounded), whoever
reads the run's events. When the model writes faster than the process turns events into
ChatKit events and saves (a fast provider, a busy process), that queue holds the whole reply,
megabytes per stream, readers or not (docs/benchmarks.md, "Clients that never read").
``PacedModel`` wraps the chat agent's model: before it hands the run one more event, it waits
while the run's queue holds ``WINDOW`` events, until the reply's reader has taken it down to
half. The model's HTTP stream then waits in its socket: back-pressure to the provider,
and at most ``WINDOW`` events held per stream. (Between this reader and the client, memory is
bounded by ``STREAM_BUFFER_BYTES``: app.http.sse.)

Ended cleanly. ``stream_agent_response`` merges the run's events with the context's own event
queue through one ``__anext__`` task per source (the SDK's ``_merge_generators``). Cut while it
waits (a disconnect, a stalled reader), it leaves both tasks behind; stopping the run and
completing the queue then finished them with ``StopAsyncIteration``, which nobody retrieved:
"Task exception was never retrieved" at garbage collection, twice per cut stream. The reply
knows those tasks (they read through ``RunFlow``'s reader and queue) and, when it is cut,
cancels the ones still waiting (the Agents SDK stops a run whose reader is cancelled) and
collects the outcome of any that finished meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any, cast

from agents import Agent, Model, ModelResponse, RunConfig, Runner, TResponseInputItem
from agents.result import RunResultStreaming
from agents.stream_events import StreamEvent
from chatkit.agents import AgentContext, stream_agent_response
from chatkit.types import ThreadStreamEvent

log = logging.getLogger(__name__)

WINDOW = 64
"""Events one reply's run may hold for its reader before the model waits."""

_flow: ContextVar[RunFlow | None] = ContextVar("run_flow", default=None)


class RunFlow:
    """What the model, the reader and the cleanup of one reply's run share."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] | None = None  # the run's own (read once per event)
        self._taken = asyncio.Event()
        # The SDK helper's latest read of each source (the run, the context's queue).
        self._reads: dict[str, asyncio.Task[Any]] = {}

    def watch(self, result: RunResultStreaming) -> None:
        queue = getattr(result, "_event_queue", None)
        self._queue = queue if isinstance(queue, asyncio.Queue) else None

    def backlog(self) -> int:
        """Events the run holds that its reader has not taken yet."""
        queue = self._queue
        return queue.qsize() if queue is not None else 0

    async def room(self) -> None:
        """Wait while the run holds ``WINDOW`` events (the model's side)."""
        while self.backlog() >= WINDOW:
            self._taken.clear()
            await self._taken.wait()

    def _read_by(self, source: str) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._reads[source] = task

    def abandon(self) -> None:
        """The reply is cut: end the helper's reads it will never collect (see the module)."""
        for source, task in self._reads.items():
            if not task.done():
                task.cancel()
                continue
            # Finished as the reply was cut (the run ended meanwhile): its outcome is ours to
            # collect, and matters no more.
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not isinstance(exc, StopAsyncIteration):
                log.debug("abandoned %s read failed", source, extra={"reason": type(exc).__name__})
        self._reads.clear()


class _ReadQueue(asyncio.Queue[Any]):
    """The agent context's event queue (tools' progress, widgets), remembering who reads it."""

    def __init__(self, flow: RunFlow) -> None:
        super().__init__()
        self._flow = flow

    async def get(self) -> Any:
        self._flow._read_by("context")
        return await super().get()


class _RunReader:
    """The run's events, each one taken telling the model there may be room. An iterator, not
    a generator: one the helper abandons must not be closed twice (by itself and by the run's
    own generator's finalizer: "aclose(): asynchronous generator is already running")."""

    def __init__(self, flow: RunFlow, result: RunResultStreaming) -> None:
        self._flow = flow
        self._stream = result.stream_events()

    def __aiter__(self) -> _RunReader:
        return self

    async def __anext__(self) -> StreamEvent:
        self._flow._read_by("run")
        event = await anext(self._stream)
        if self._flow.backlog() <= WINDOW // 2:
            self._flow._taken.set()
        return event


class _RunView:
    """What ``stream_agent_response`` reads of the run: its events, through ``_RunReader``."""

    def __init__(self, flow: RunFlow, result: RunResultStreaming) -> None:
        self._flow = flow
        self._result = result

    def stream_events(self) -> AsyncIterator[StreamEvent]:
        return _RunReader(self._flow, self._result)


class PacedModel(Model):
    """The chat agent's model, waiting for the reply's reader (see the module). Outside a
    reply (a title, a test calling it directly) it is the model itself."""

    def __init__(self, inner: Model) -> None:
        self.inner = inner

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        return await self.inner.get_response(*args, **kwargs)

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        flow = _flow.get()
        stream = self.inner.stream_response(*args, **kwargs)
        try:
            async for event in stream:
                if flow is not None and flow.backlog() >= WINDOW:
                    await flow.room()
                yield event
        finally:
            close = getattr(stream, "aclose", None)  # closed now, as the Agents SDK closes ours
            if close is not None:
                await close()

    async def close(self) -> None:
        await self.inner.close()

    def get_retry_advice(self, request: Any) -> Any:
        return self.inner.get_retry_advice(request)

    async def _cleanup_on_run_end(self, owner: object) -> None:
        await self.inner._cleanup_on_run_end(owner)


async def reply_events(
    agent: Agent[Any],
    agent_input: list[TResponseInputItem],
    context: AgentContext[Any],
    *,
    max_turns: int,
    run_config: RunConfig,
) -> AsyncIterator[ThreadStreamEvent]:
    """``stream_agent_response`` over a new run of ``agent``; the run is stopped and the
    helper's reads ended if the reply does not finish (cut, failed)."""
    flow = RunFlow()
    token = _flow.set(flow)  # the run's task is made now and keeps this value
    try:
        result = Runner.run_streamed(
            agent, agent_input, context=context, max_turns=max_turns, run_config=run_config
        )
    finally:
        _flow.reset(token)
    flow.watch(result)
    context._events = _ReadQueue(flow)
    finished = False
    try:
        async for event in stream_agent_response(
            context, cast(RunResultStreaming, _RunView(flow, result))
        ):
            yield event
        finished = True
    finally:
        if not finished:
            flow.abandon()
            result.cancel()
