"""Shutdown waits for background work, including saves that a cancellation starts."""

from __future__ import annotations

import asyncio

from app.background import TaskRegistry


async def test_drain_waits_for_work_spawned_by_cancellation() -> None:
    registry = TaskRegistry()
    saved: list[str] = []

    async def save() -> None:
        await asyncio.sleep(0.05)
        saved.append("partial reply")

    async def stream() -> None:
        try:
            await asyncio.Event().wait()  # a reply that never ends by itself
        except asyncio.CancelledError:
            registry.spawn(save(), name="save")  # started by the cancellation, not awaited
            raise

    async def quick() -> None:
        await asyncio.sleep(0.01)
        saved.append("quick")

    registry.spawn(stream(), name="stream")
    registry.spawn(quick(), name="quick")
    await registry.drain(0.2)
    assert saved == ["quick", "partial reply"]
    assert len(registry) == 0
