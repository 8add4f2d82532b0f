"""The run log's table kind (docs/runs.md): one batch append (``chatkit_run_append``) against
UNLOGGED tables, as migration 0006 makes them, and against the same tables SET LOGGED, in one
run on one server. Concurrent writers, as replies stream side by side; each writes batches of
``EVENTS`` events of ``EVENT_BYTES`` each (about one flush interval of a fast reply).

    .venv/bin/python -m bench.runlog_bench [postgresql://postgres@127.0.0.1:5432/postgres]

Prints the median and p95 time per append and the ratio logged / unlogged.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import asyncpg

from app.pg.runlog import RUN_APPEND, RUN_START
from tests.harness.pg import migrate

WRITERS = 16
BATCHES = 150
EVENTS = 8
EVENT_BYTES = 180
DATABASE = "ckpg_durable_runlog_bench"


async def one_kind(dsn: str, tag: str) -> list[float]:
    pool = await asyncpg.create_pool(dsn, min_size=WRITERS, max_size=WRITERS)
    events = ["data: " + "x" * (EVENT_BYTES - 6)] * EVENTS
    times: list[float] = []

    async def writer(n: int) -> None:
        user, run = f"user-{n}", f"run_{tag}_{n}"
        async with pool.acquire() as conn:
            await conn.execute(RUN_START, user, run, None)
            for b in range(BATCHES):
                started = time.perf_counter()
                await conn.fetchval(RUN_APPEND, user, run, b * EVENTS + 1, events, "running")
                times.append(time.perf_counter() - started)

    await asyncio.gather(*(writer(n) for n in range(WRITERS)))
    await pool.close()
    return times


def summary(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered) * 1e6, ordered[int(len(ordered) * 0.95)] * 1e6


async def main(server: str) -> None:
    admin = await asyncpg.connect(server)
    await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
    await admin.execute(f"CREATE DATABASE {DATABASE}")
    await admin.close()
    base = server.rsplit("/", 1)[0]
    dsn = f"{base}/{DATABASE}"
    await asyncio.to_thread(migrate, dsn.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        results = {}
        for kind in ("unlogged", "logged", "unlogged again"):
            if kind == "logged":
                conn = await asyncpg.connect(dsn)
                await conn.execute("ALTER TABLE chatkit_runs SET LOGGED")
                await conn.execute("ALTER TABLE chatkit_run_events SET LOGGED")
                await conn.close()
            if kind == "unlogged again":
                conn = await asyncpg.connect(dsn)
                await conn.execute("ALTER TABLE chatkit_run_events SET UNLOGGED")
                await conn.execute("ALTER TABLE chatkit_runs SET UNLOGGED")
                await conn.close()
            results[kind] = summary(await one_kind(dsn, kind.replace(" ", "_")))
            median, p95 = results[kind]
            print(
                f"{kind:15} append of {EVENTS} events, {WRITERS} writers: "
                f"median {median:.0f} us, p95 {p95:.0f} us"
            )
        conn = await asyncpg.connect(dsn)
        size = await conn.fetchval("SELECT pg_total_relation_size('chatkit_run_events')")
        rows = await conn.fetchval("SELECT count(*) FROM chatkit_run_events")
        await conn.close()
        print(
            f"storage: {size / rows:.0f} bytes per logged event of {EVENT_BYTES} bytes "
            "(table, TOAST and primary key)"
        )
        unlogged = min(results["unlogged"][0], results["unlogged again"][0])
        print(f"logged / unlogged (median): {results['logged'][0] / unlogged:.2f}x")
    finally:
        admin = await asyncpg.connect(server)
        await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/postgres")
    )
