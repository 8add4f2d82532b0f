"""Tasks that must outlive the request that started them (stream pumps, saves after a client
disconnect). Shutdown waits for them before the engine is disposed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskRegistry:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        """Start ``coro`` in its own task (with a copy of the current context) and keep it."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task %s failed", task.get_name(), exc_info=exc)

    async def drain(self, grace_seconds: float, *, after_cancel_seconds: float = 5.0) -> None:
        """Wait up to ``grace_seconds`` for every task (new ones included), then cancel what is
        left and give the work that cancellation starts (saving a cancelled reply) a little
        more time."""
        await self._wait_all(grace_seconds)
        if not self._tasks:
            return
        for task in list(self._tasks):
            log.warning("cancelling background task %s at shutdown", task.get_name())
            task.cancel()
        await self._wait_all(after_cancel_seconds)

    async def _wait_all(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self._tasks and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
