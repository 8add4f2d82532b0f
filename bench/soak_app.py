"""The app the soak run (``bench/soak.py``) serves from one uvicorn worker.

``create_soak_app()`` is the real ``app.main.create_app`` with:

* ``SoakModel``, a scripted ``agents.Model`` that streams numbered text deltas at a steady
  pace. The user's message chooses the reply: ``soak deltas=60 interval_ms=80 tag=u0001s0001``
  streams 60 deltas ``"u0001s0001:tok-0001 "``, ``"u0001s0001:tok-0002 "``, ... 80 ms apart,
  so a client can check that every delta of every stream arrives once, in order, in the
  stream it belongs to;
* ``SOAK_WITHOUT_LIMITS=1``: the per-user limits (and their stream leases) switched off, to
  measure what they cost;
* an event-loop lag monitor: a task that sleeps 10 ms in a loop and records how late it
  wakes up (``time.monotonic()``, system-wide on Linux, so the client can cut windows);
* ``GET /soak/stats`` (RSS, the pool's checked-out connections now and at their peak since the
  last ``?reset_peak=true``, physical connections made, open streams, tasks) and
  ``GET /soak/lag?since=&until=`` (the lag samples of a window, and how long each pooled
  connection was held from checkout to checkin, in ms).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psutil
from agents import Model, ModelResponse
from agents.items import TResponseInputItem, TResponseStreamEvent
from fastapi import FastAPI, Request

from app.chat.offline_model import _last_user_text, text_response_events
from app.ids import new_id
from app.main import create_app
from app.settings import get_settings

LAG_INTERVAL = 0.010
_SOAK = re.compile(r"soak deltas=(\d+) interval_ms=([\d.]+) tag=(\S+)")


def delta_text(tag: str, n: int) -> str:
    """The ``n``-th delta (from 1) of the reply tagged ``tag``."""
    return f"{tag}:tok-{n:04d} "


class SoakModel(Model):
    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        raise NotImplementedError("the soak run only streams")

    async def stream_response(  # type: ignore[override]
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        *args: Any,
        **kwargs: Any,
    ) -> AsyncIterator[TResponseStreamEvent]:
        match = _SOAK.search(_last_user_text(input))
        deltas, interval, tag = (
            (int(match[1]), float(match[2]) / 1000, match[3]) if match else (10, 0.05, "x")
        )
        # Made as they are sent: a long reply costs the model nothing up front (bench/stall_bench).
        chunks = (delta_text(tag, n) for n in range(1, deltas + 1))
        for event in text_response_events(chunks, item_id=new_id("message")):
            if event.type == "response.output_text.delta":
                await asyncio.sleep(interval)
            yield event


class PoolWatch:
    """An observer of the app's pool (``app.pg.pool.PoolObserver``): how long each borrow waited
    for a connection and how long it held it (checkout to checkin)."""

    def __init__(self) -> None:
        self.holds: deque[tuple[float, float]] = deque(maxlen=500_000)  # (checked in, held s)
        self.waits: deque[tuple[float, float]] = deque(maxlen=500_000)  # (checked out, waited s)

    def borrowed(self, waited: float) -> None:
        self.waits.append((time.monotonic(), waited))

    def returned(self, held: float) -> None:
        self.holds.append((time.monotonic(), held))

    def wait_window(self, since: float, until: float) -> list[float]:
        return [round(w * 1000, 3) for t, w in self.waits if since <= t < until]

    def window(self, since: float, until: float) -> list[float]:
        return [round(held * 1000, 3) for t, held in self.holds if since <= t < until]


class LagMonitor:
    """How late a 10 ms sleep wakes up, sample by sample."""

    def __init__(self, interval: float = LAG_INTERVAL) -> None:
        self.interval = interval
        self.samples: deque[tuple[float, float]] = deque(maxlen=500_000)  # (started, lag s)

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(self.interval)
            self.samples.append((started, time.monotonic() - started - self.interval))

    def window(self, since: float, until: float) -> list[float]:
        return [round(lag * 1000, 3) for t, lag in self.samples if since <= t < until]


def create_soak_app() -> FastAPI:
    app = create_app(get_settings(), model=SoakModel())
    monitor = LagMonitor()
    watch = PoolWatch()
    process = psutil.Process()
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        async with inner(application) as state:
            application.state.pool.observer = watch
            if os.environ.get("SOAK_WITHOUT_LIMITS") == "1":
                # A/B knob: the same server without per-user limits and stream leases.
                application.state.runtime.limits = None
            task = asyncio.create_task(monitor.run(), name="soak-lag-monitor")
            try:
                yield state
            finally:
                task.cancel()

    app.router.lifespan_context = lifespan

    @app.get("/soak/stats")
    async def stats(request: Request, reset_peak: bool = False) -> dict[str, Any]:
        state = request.app.state
        pool = state.pool
        runtime = state.runtime
        peak = pool.peak_in_use
        if reset_peak:
            pool.peak_in_use = pool.in_use
        return {
            "pid": process.pid,
            "monotonic": time.monotonic(),
            "rss": process.memory_info().rss,
            "pool": {
                "checked_out": pool.in_use,
                "size": pool.size(),
                "max_size": pool.max_size,
                "peak_checked_out": peak,
                "connects": pool.connects,
            },
            "active_streams": runtime.metrics.active_streams._value.get(),
            "background_tasks": len(runtime.tasks),
            "asyncio_tasks": len(asyncio.all_tasks()),
            "fds": process.num_fds(),
        }

    @app.get("/soak/lag")
    async def lag(since: float = 0.0, until: float = float("inf")) -> dict[str, Any]:
        return {
            "interval_ms": monitor.interval * 1000,
            "lag_ms": monitor.window(since, until),
            "pool_hold_ms": watch.window(since, until),
            "pool_wait_ms": watch.wait_window(since, until),
        }

    return app
