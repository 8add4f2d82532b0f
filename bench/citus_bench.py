"""Citus benchmark: every ``PostgresStore`` method on a 3-node cluster against one PostgreSQL.

Both sides are private servers started for the run from the same binaries (the machine's
PostgreSQL 15, tests/harness/citus.py) with the same options, reached over TCP on 127.0.0.1:

* ``single``: one plain node (no Citus loaded), migrated;
* ``citus``: a coordinator and two workers, migrated and distributed (``python -m app
  distribute``'s function), the store talking to the coordinator.

Each side's store is the app's own (``app.pg.pool.open_pool``, the app's settings) connecting as
a role without BYPASSRLS, as production does. Each round runs every method on both sides, the
side order alternating from round to round; a side's figure for a round is the mean over
``CALLS`` back-to-back calls, and we quote, per method, the median over rounds and the ratio of
the medians, citus/single. Rows a call consumes (deletes) are made before its batch, untimed.

It also counts the statements that are single-shard on the cluster (one task in Citus' EXPLAIN,
no subplan; tests/citus/test_citus.py asserts it for every one).

On a machine with one cluster on its own cores this measures the price of the extra hop
(coordinator to worker) and of the cluster's write transaction; it says nothing about the
throughput that more workers add.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from app.cli.distribute import distribute, plain_dsn
from app.pg.pool import open_pool
from app.pg.store import PostgresStore
from app.settings import PROJECT_ROOT, Settings
from tests.harness import factories as f
from tests.harness.citus import NODE_OPTIONS, PG_BIN, citus_cluster, citus_missing
from tests.harness.pg import migrate
from tests.harness.pginstance import SYSTEM_USER, PgInstance, _prepare_for, _short_temp_root

ROUNDS = int(os.environ.get("BENCH_CITUS_ROUNDS", "7"))
CALLS = int(os.environ.get("BENCH_CITUS_CALLS", "60"))
RESULTS = PROJECT_ROOT / "bench" / "results" / "citus.json"
CTX = {"user_id": "bench_user"}
TABLES = (
    "chatkit_threads, chatkit_items, chatkit_attachments, chatkit_attachment_blobs, "
    "chatkit_feedback, chatkit_rate_limits, chatkit_stream_leases"
)


@asynccontextmanager
async def _single_node() -> AsyncIterator[str]:
    """One plain PostgreSQL from the cluster's binaries and options, without Citus."""
    import shutil

    root = _short_temp_root()
    user = SYSTEM_USER if os.geteuid() == 0 else None
    from tests.harness.citus import _free_ports

    [port] = _free_ports(1)
    options = NODE_OPTIONS.replace("-c shared_preload_libraries=citus ", "")
    node = PgInstance(root, user, bin_dir=PG_BIN, port=port, listen="127.0.0.1", options=options)
    try:
        if user is not None:
            _prepare_for(user, root, PG_BIN)
        node.socket_dir.mkdir()
        if user is not None:
            shutil.chown(node.socket_dir, user, user)
        node.init()
        node.start()
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
        await conn.execute("CREATE DATABASE bench")
        await conn.close()
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/bench"
    finally:
        node.cleanup()


async def _app_role(url: str) -> str:
    """A role as docs/rls.md makes it (no BYPASSRLS); the server is deleted after the run."""
    role, password = f"bench_app_{secrets.token_hex(4)}", secrets.token_hex(12)
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' NOBYPASSRLS")
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLES} TO {role}")
    finally:
        await conn.close()
    return make_url(url).set(username=role, password=password).render_as_string(False)


class Side:
    """One side's store plus the rows its calls read."""

    def __init__(self, name: str, store: PostgresStore) -> None:
        self.name = name
        self.store = store
        self.thread = f.thread()
        self.items = [
            f.user_message(self.thread.id, f"m{i}", f.T0 + timedelta(seconds=i)) for i in range(50)
        ]
        self.attachment = f.file_attachment(self.thread.id)

    async def seed(self) -> None:
        await self.store.save_thread(self.thread, CTX)
        for item in self.items:
            await self.store.add_thread_item(self.thread.id, item, CTX)
        await self.store.save_attachment(self.attachment, CTX)
        await self.store.save_feedback(self.thread.id, [self.items[0].id], "positive", CTX)


Prepare = Callable[[Side], Awaitable[list[Any]]]
Call = Callable[[Side, Any], Awaitable[Any]]


async def _none(side: Side) -> list[Any]:
    return [None] * CALLS


async def _new_items(side: Side) -> list[Any]:
    items = [f.user_message(side.thread.id, "x") for _ in range(CALLS)]
    for item in items:
        await side.store.add_thread_item(side.thread.id, item, CTX)
    return items


async def _new_threads(side: Side) -> list[Any]:
    threads = [f.thread() for _ in range(CALLS)]
    for thread in threads:
        await side.store.save_thread(thread, CTX)
    return threads


async def _new_attachments(side: Side) -> list[Any]:
    atts = [f.file_attachment(None) for _ in range(CALLS)]
    for att in atts:
        await side.store.save_attachment(att, CTX)
    return atts


METHODS: dict[str, tuple[Prepare, Call]] = {
    "load_thread": (_none, lambda x, _: x.store.load_thread(x.thread.id, CTX)),
    "save_thread": (_none, lambda x, _: x.store.save_thread(x.thread, CTX)),
    "load_threads": (_none, lambda x, _: x.store.load_threads(20, None, "desc", CTX)),
    "load_thread_items": (
        _none,
        lambda x, _: x.store.load_thread_items(x.thread.id, None, 20, "asc", CTX),
    ),
    "add_thread_item": (
        _none,
        lambda x, _: x.store.add_thread_item(x.thread.id, f.user_message(x.thread.id, "y"), CTX),
    ),
    "save_item": (_none, lambda x, _: x.store.save_item(x.thread.id, x.items[1], CTX)),
    "load_item": (_none, lambda x, _: x.store.load_item(x.thread.id, x.items[2].id, CTX)),
    "delete_thread_item": (
        _new_items,
        lambda x, item: x.store.delete_thread_item(x.thread.id, item.id, CTX),
    ),
    "save_attachment": (_none, lambda x, _: x.store.save_attachment(x.attachment, CTX)),
    "load_attachment": (_none, lambda x, _: x.store.load_attachment(x.attachment.id, CTX)),
    "delete_attachment": (
        _new_attachments,
        lambda x, att: x.store.delete_attachment(att.id, CTX),
    ),
    "save_feedback": (
        _none,
        lambda x, _: x.store.save_feedback(x.thread.id, [x.items[3].id], "negative", CTX),
    ),
    "load_feedback": (_none, lambda x, _: x.store.load_feedback(x.thread.id, CTX)),
    "delete_thread": (_new_threads, lambda x, thread: x.store.delete_thread(thread.id, CTX)),
}


async def _batch(side: Side, method: str) -> float:
    prepare, call = METHODS[method]
    args = await prepare(side)
    start = time.perf_counter()
    for arg in args:
        await call(side, arg)
    return (time.perf_counter() - start) / len(args) * 1e6  # µs per call


async def _single_shard_share(url: str) -> dict[str, Any]:
    from tests.citus.test_citus import citus_statements, explain, single_shard

    conn = await asyncpg.connect(plain_dsn(url))
    try:
        names = [n for n in citus_statements() if not n.startswith("limits.")]
        single = [n for n in names if single_shard(await explain(conn, *citus_statements()[n]))]
    finally:
        await conn.close()
    return {"statements": len(names), "single_shard": len(single)}


async def _bench() -> dict[str, Any]:
    settings = Settings(data_dir=Path(os.environ.get("TMPDIR", "/tmp")))
    async with _single_node() as single_url:
        with citus_cluster() as cluster:
            citus_url = await cluster.create_database("bench")
            for url in (single_url, citus_url):
                await asyncio.to_thread(migrate, url)
            await distribute(plain_dsn(citus_url))
            share = await _single_shard_share(citus_url)
            engines = {
                "single": await open_pool(await _app_role(single_url), settings),
                "citus": await open_pool(await _app_role(citus_url), settings),
            }
            try:
                sides = [Side(name, PostgresStore(eng)) for name, eng in engines.items()]
                for side in sides:
                    await side.seed()
                    for method in METHODS:  # warm-up: pools, prepared statements
                        await _batch(side, method)
                per: dict[str, dict[str, list[float]]] = {
                    m: {s.name: [] for s in sides} for m in METHODS
                }
                for r in range(ROUNDS):
                    order = sides if r % 2 == 0 else list(reversed(sides))
                    for method in METHODS:
                        for side in order:
                            per[method][side.name].append(await _batch(side, method))
                    print(f"round {r + 1}/{ROUNDS} done", flush=True)
            finally:
                for eng in engines.values():
                    await eng.close()
    methods = {}
    for method, by_side in per.items():
        single_us = statistics.median(by_side["single"])
        citus_us = statistics.median(by_side["citus"])
        methods[method] = {
            "single_us": round(single_us, 1),
            "citus_us": round(citus_us, 1),
            "ratio": round(citus_us / single_us, 2),
        }
    return {"rounds": ROUNDS, "calls": CALLS, "methods": methods, "statements": share}


def run() -> dict[str, Any]:
    reason = citus_missing()
    if reason is not None:
        print(f"citus bench skipped: {reason}")
        return {}
    res = asyncio.run(_bench())
    print(f"\n{'method':22s} {'single µs':>10s} {'citus µs':>10s} {'ratio':>6s}")
    for method, m in res["methods"].items():
        print(f"{method:22s} {m['single_us']:10.0f} {m['citus_us']:10.0f} {m['ratio']:6.2f}")
    st = res["statements"]
    print(f"\nsingle-shard statements on the cluster: {st['single_shard']}/{st['statements']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    run()
