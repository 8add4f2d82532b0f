"""The per-statement costs behind a turn's round trips (docs/runs.md, docs/citus.md): one run log
batch (``chatkit_run_append``, 8 events of 180 bytes: a flush interval of a fast reply) and one
item insert (``add_thread_item``), on one plain PostgreSQL and on a 3-node Citus cluster started
from the same binaries with the same options (bench/citus_bench.py's set-up), through a role
without BYPASSRLS. On the cluster the insert is measured both ways: the delegated function call
the store now makes (one round trip) and the Citus form it made before (BEGIN with the user's
SETs, the INSERT, COMMIT).

    .venv/bin/python -m bench.statement_bench

Rounds alternate the side order; a side's figure for a round is the mean over ``CALLS``
back-to-back calls; quoted: the median over rounds per side, and the ratios.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from app.cli.distribute import distribute, plain_dsn
from app.ids import new_id
from app.pg.citus import write_as
from app.pg.pool import ConnectionPool, open_pool
from app.pg.runlog import RUN_APPEND, RUN_START
from app.pg.sql import CITUS_FORMS
from app.pg.store import SQL_ADD_ITEM, PostgresStore, _dump, _ts
from app.settings import Settings
from bench.citus_bench import _app_role, _single_node
from tests.harness import factories as f
from tests.harness.citus import citus_cluster, citus_missing
from tests.harness.pg import migrate

ROUNDS = int(os.environ.get("BENCH_TURN_ROUNDS", "5"))
CALLS = int(os.environ.get("BENCH_TURN_CALLS", "40"))
USER = "bench_user"
EVENTS = ["data: " + "x" * 174] * 8


class Side:
    def __init__(self, name: str, pool: ConnectionPool) -> None:
        self.name = name
        self.pool = pool
        self.store = PostgresStore(pool)
        self.thread = f.thread()
        self.run = new_id("run")
        self.seq = 1

    async def seed(self) -> None:
        await self.store.save_thread(self.thread, {"user_id": USER})
        async with self.pool.acquire() as conn:
            await conn.execute(RUN_START, USER, self.run, self.thread.id)

    async def append(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.fetchval(RUN_APPEND, USER, self.run, self.seq, EVENTS, "running")
        self.seq += len(EVENTS)

    async def add_item(self) -> None:
        item = f.user_message(self.thread.id, "hello")
        await self.store.add_thread_item(self.thread.id, item, {"user_id": USER})

    async def add_item_in_a_transaction(self) -> None:
        """The Citus form through BEGIN/SET, INSERT, COMMIT (the store's path before)."""
        item = f.user_message(self.thread.id, "hello")
        args = (USER, self.thread.id, item.id, _ts(item.created_at), item.type, _dump(item))
        async with self.pool.acquire() as conn:
            await write_as(conn, USER, CITUS_FORMS[SQL_ADD_ITEM], args, fetch="fetchval")


async def _mean_us(call: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        await call()
    return (time.perf_counter() - start) / CALLS * 1e6


async def _grant_run_log(url: str, role_url: str) -> None:
    from sqlalchemy.engine import make_url

    role = make_url(role_url).username
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        await conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON chatkit_runs, chatkit_run_events TO {role}"
        )
    finally:
        await conn.close()


async def _bench() -> dict[str, dict[str, float]]:
    settings = Settings(data_dir=Path(os.environ.get("TMPDIR", "/tmp")))
    async with _single_node() as single_url:
        with citus_cluster() as cluster:
            citus_url = await cluster.create_database("bench")
            for url in (single_url, citus_url):
                await asyncio.to_thread(migrate, url)
            await distribute(plain_dsn(citus_url))
            pools = {}
            for name, url in (("single", single_url), ("citus", citus_url)):
                role_url = await _app_role(url)
                await _grant_run_log(url, role_url)
                pools[name] = await open_pool(role_url, settings)
            sides = [Side(name, pool) for name, pool in pools.items()]
            methods: dict[str, Callable[[Side], Callable[[], Awaitable[None]]]] = {
                "run log batch (chatkit_run_append)": lambda s: s.append,
                "add_thread_item (as the store does)": lambda s: s.add_item,
                "add_thread_item (BEGIN/INSERT/COMMIT)": lambda s: s.add_item_in_a_transaction,
            }
            per: dict[str, dict[str, list[float]]] = {
                m: {s.name: [] for s in sides} for m in methods
            }
            try:
                for side in sides:
                    await side.seed()
                    for method in methods.values():  # warm-up
                        await _mean_us(method(side))
                for r in range(ROUNDS):
                    order = sides if r % 2 == 0 else list(reversed(sides))
                    for name, method in methods.items():
                        for side in order:
                            per[name][side.name].append(await _mean_us(method(side)))
                    print(f"round {r + 1}/{ROUNDS} done", flush=True)
            finally:
                for pool in pools.values():
                    await pool.close()
    return {m: {s: statistics.median(v) for s, v in by.items()} for m, by in per.items()}


def run() -> dict[str, Any]:
    reason = citus_missing()
    if reason is not None:
        print(f"turn bench skipped: {reason}")
        return {}
    res = asyncio.run(_bench())
    print(f"\n{'statement':40s} {'single µs':>10s} {'citus µs':>10s} {'ratio':>6s}")
    for name, m in res.items():
        print(f"{name:40s} {m['single']:10.0f} {m['citus']:10.0f} {m['citus'] / m['single']:6.2f}")
    return res


if __name__ == "__main__":
    run()
