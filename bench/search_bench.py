"""``python -m bench search``: thread search (app.pg.search, migrations 0005 and 0007), three
figures.

1. The write path: ``add_thread_item`` on a database with the search trigger vs the same run's
   database at revision 0004 (no column, no trigger), rounds alternating, median per item of
   the wall time and of the server backends' CPU time (/proc/<pid>/schedstat, where the server
   runs on this machine: not inflated by other processes waiting for the two cores), for
   alternating messages, 12-word user messages alone and 85-word replies alone; the target is
   a ratio of at most 1.15.
2. The migration on a populated table: 1,000,000 items (100 users; one of them with 100,000)
   loaded at 0004, then ``alembic upgrade head`` while a writer adds an item every 20 ms: how
   long the migration takes and the writer's worst wait (it must never be blocked for long).
3. Queries of that one user among the 1,000,000 through ThreadSearch (custom plans): p50 and
   p95 for common words, a word of middling frequency, rare words and prefixes (1, 3 and 5
   letters); target p95 <= 30 ms; EXPLAIN ANALYZE of each.

Words are pseudo-words drawn log-uniformly from a vocabulary of 20,000 (the most common is in
about half of the messages, the rarest in a handful). Figures land in bench/results/search.json.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from chatkit.types import AssistantMessageContent, AssistantMessageItem

from app.ids import new_id
from app.pg.pool import open_pool
from app.pg.search import (
    HEADLINE_OPTIONS,
    SQL_BEGIN_CUSTOM,
    SQL_QUERY,
    SQL_SEARCH,
    ThreadSearch,
    parse_query,
)
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness import factories as f
from tests.harness.pg import PgServer, describe, migrate, postgres_server

RESULTS_DIR = Path(__file__).parent / "results"
VOCAB = 20_000
WRITE_ROUNDS = 9
WRITES_PER_ROUND = 200
QUERY_REPEATS = 12

_WORD = "translate(substr(md5(r::text), 1, 7), '0123456789', 'ghijklmnop')"
LOAD = [
    f"CREATE TEMP TABLE vocab AS SELECT r, {_WORD} AS w FROM generate_series(1, {VOCAB}) r",
    "CREATE UNIQUE INDEX ON vocab (r)",
    # Ten times log-uniform draws: word r with probability ~ 1 / (r ln VOCAB).
    f"""CREATE TEMP TABLE drawn AS SELECT n, (SELECT string_agg((SELECT w FROM vocab
        WHERE r = x.r), ' ') FROM (SELECT floor(exp(random() * ln({VOCAB})))::int AS r
        FROM generate_series(1, 8 + n % 10)) x) AS text FROM generate_series(0, 999999) n""",
    # u0: every tenth item (100,000, in 1,000 threads); 90 other users share the rest.
    """CREATE TEMP TABLE placed AS SELECT n, text,
        CASE WHEN n % 10 = 0 THEN 'u0' ELSE 'u' || (n % 100) END AS user_id,
        CASE WHEN n % 10 = 0 THEN 'u0t' || ((n / 10) % 1000)
             ELSE 'u' || (n % 100) || 't' || ((n / 100) % 100) END AS thread_id FROM drawn""",
    """INSERT INTO chatkit_threads (user_id, id, created_at, title, data)
        SELECT DISTINCT ON (user_id, thread_id) user_id, thread_id, now(),
        split_part(text, ' ', 1) || ' ' || split_part(text, ' ', 2), '{}'
        FROM placed ORDER BY user_id, thread_id, n""",
    """INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data)
        SELECT user_id, thread_id, 'i' || n, now() - make_interval(secs => 1000000 - n),
        CASE WHEN n % 7 = 3 THEN 'hidden_context_item' WHEN n % 2 = 0 THEN 'user_message'
             ELSE 'assistant_message' END,
        jsonb_build_object('content', jsonb_build_array(jsonb_build_object(
            'type', CASE WHEN n % 2 = 0 THEN 'input_text' ELSE 'output_text' END,
            'text', text))) FROM placed ORDER BY n""",
    "ANALYZE",
]
USER_TEXT = "could you compare the harbour tides with last week's readings please"
ASSISTANT_TEXT = " ".join(
    ["The tides this week ran higher than last week's, peaking on Thursday at 2.3 m;"] * 6
)  # ~85 words, a typical reply


def _ms(seconds: list[float]) -> dict[str, float]:
    s = sorted(seconds)
    return {
        "p50_ms": round(statistics.median(s) * 1000, 2),
        "p95_ms": round(s[min(len(s) - 1, round(0.95 * (len(s) - 1)))] * 1000, 2),
        "max_ms": round(s[-1] * 1000, 2),
        "n": len(s),
    }


def _item(thread_id: str, n: int) -> Any:
    at = f.T0 + timedelta(seconds=n)
    if n % 2 == 0:
        return f.user_message(thread_id, USER_TEXT, at)
    return AssistantMessageItem(
        id=new_id("message"),
        thread_id=thread_id,
        created_at=at,
        content=[AssistantMessageContent(text=ASSISTANT_TEXT)],
    )


def _cpu_ns(pids: list[int]) -> int | None:
    """The CPU time the backends ``pids`` have run, from /proc (a server on this machine);
    None where it cannot be read (a container, another host)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
    return total


async def _backends(store: PostgresStore) -> list[int]:
    async with store.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend'"
        )
    return [r[0] for r in rows]


async def _write_round(store: PostgresStore, only: int | None = None) -> tuple[float, float | None]:
    """Seconds per item (wall) and the backends' CPU seconds per item; ``only``: every item a
    user message (0) or an assistant reply (1), else alternating."""
    ctx = {"user_id": "writer"}
    thread = f.thread()
    await store.save_thread(thread, ctx)
    items = [_item(thread.id, n if only is None else 2 * n + only) for n in range(WRITES_PER_ROUND)]
    pids = await _backends(store)
    cpu_before = _cpu_ns(pids)
    started = time.perf_counter()
    for item in items:
        await store.add_thread_item(thread.id, item, ctx)
    wall = (time.perf_counter() - started) / WRITES_PER_ROUND
    cpu_after = _cpu_ns(pids)
    if cpu_before is None or cpu_after is None or set(pids) != set(await _backends(store)):
        return wall, None
    return wall, (cpu_after - cpu_before) / 1e9 / WRITES_PER_ROUND


async def bench_writes(base_url: str, search_url: str, settings: Settings) -> dict[str, Any]:
    """Both databases' rounds alternating: wall time per item and, where /proc shows the
    server's backends, their CPU time per item (not inflated by other processes' run queue),
    for alternating messages and for 12-word user messages and 85-word replies alone."""
    pools = [await open_pool(base_url, settings), await open_pool(search_url, settings)]
    out: dict[str, Any] = {}
    try:
        stores = [PostgresStore(p) for p in pools]
        for store in stores:  # warm up: connections, prepared statements
            await _write_round(store)
        for label, only in (("alternating", None), ("user_message", 0), ("assistant_message", 1)):
            wall: list[list[float]] = [[], []]
            cpu: list[list[float]] = [[], []]
            for r in range(WRITE_ROUNDS):
                for which in (0, 1) if r % 2 == 0 else (1, 0):
                    w, c = await _write_round(stores[which], only)
                    wall[which].append(w)
                    if c is not None:
                        cpu[which].append(c)
            base, search = (statistics.median(x) for x in wall)
            figures: dict[str, Any] = {
                "baseline_us_per_item": round(base * 1e6, 1),
                "with_search_us_per_item": round(search * 1e6, 1),
                "ratio": round(search / base, 3),
            }
            if all(cpu):
                cbase, csearch = (statistics.median(x) for x in cpu)
                figures |= {
                    "db_cpu_baseline_us_per_item": round(cbase * 1e6, 1),
                    "db_cpu_with_search_us_per_item": round(csearch * 1e6, 1),
                    "db_cpu_ratio": round(csearch / cbase, 3),
                }
            out[label] = figures
            print(f"write path, {label}: {json.dumps(figures)}", flush=True)
    finally:
        for p in pools:
            await p.close()
    return {
        **out["alternating"],
        "by_kind": {k: v for k, v in out.items() if k != "alternating"},
        "rounds": WRITE_ROUNDS,
        "items_per_round": WRITES_PER_ROUND,
        "target_ratio": 1.15,
    }


async def load(url: str) -> float:
    started = time.perf_counter()
    conn = await asyncpg.connect(PgServer.dsn(url))
    try:
        for sql in LOAD:
            await conn.execute(sql)
    finally:
        await conn.close()
    return time.perf_counter() - started


async def migrate_under_writes(url: str, settings: Settings) -> dict[str, Any]:
    """``alembic upgrade head`` while a writer adds an item every 20 ms; its waits."""
    pool = await open_pool(url, settings)
    store = PostgresStore(pool)
    ctx = {"user_id": "u0"}
    waits: list[float] = []
    done = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not done.is_set():
            item = f.user_message("u0t1", f"written during the migration {n}", datetime.now())
            started = time.perf_counter()
            await store.add_thread_item("u0t1", item, ctx)
            waits.append(time.perf_counter() - started)
            n += 1
            await asyncio.sleep(0.02)

    task = asyncio.create_task(writer())
    started = time.perf_counter()
    try:
        await asyncio.to_thread(migrate, url)
    finally:
        took = time.perf_counter() - started
        done.set()
        await task
    async with pool.acquire() as conn:
        missing = await conn.fetchval(
            "SELECT count(*) FROM chatkit_items WHERE search_vector IS NULL "
            "AND type IN ('user_message', 'assistant_message')"
        )
        await conn.execute("ANALYZE chatkit_threads, chatkit_items")
    await pool.close()
    return {
        "migration_s": round(took, 1),
        "writes_during": len(waits),
        "writer_wait": _ms(waits),
        "messages_left_without_vector": missing,
    }


async def bench_queries(url: str, settings: Settings) -> dict[str, Any]:
    pool = await open_pool(url, settings)
    search = ThreadSearch(pool)
    async with pool.acquire() as conn:
        words = {
            r: w
            for r, w in await conn.fetch(
                f"SELECT r, {_WORD} FROM generate_series(1, {VOCAB}) r "
                "WHERE r <= 5 OR r BETWEEN 300 AND 304 OR r BETWEEN 15001 AND 15010"
            )
        }
    kinds = {
        "common word": [f"{words[r]} " for r in range(1, 6)],
        "two common words": [f"{words[r]} {words[r + 1]} " for r in range(1, 5)],
        "word of middling frequency": [f"{words[r]} " for r in range(300, 305)],
        "rare word": [f"{words[r]} " for r in range(15001, 15011)],
        "prefix (1 letter)": [words[r][:1] for r in range(1, 6)],
        "prefix (3 letters)": [words[r][:3] for r in range(1, 6)],
        "prefix (5 letters)": [words[r][:5] for r in range(1, 6)],
    }
    out: dict[str, Any] = {}
    try:
        for kind, queries in kinds.items():
            times: list[float] = []
            hits = []
            for _ in range(QUERY_REPEATS):
                for q in queries:
                    started = time.perf_counter()
                    page = await search.search("u0", q, limit=20)
                    times.append(time.perf_counter() - started)
                    hits.append(len(page.hits))
            async with pool.acquire() as conn:
                terms = parse_query(queries[0])
                query = await conn.fetchval(SQL_QUERY, terms.text, terms.prefix)
                matches = await conn.fetchval(
                    "SELECT count(*) FROM chatkit_items WHERE user_id = 'u0' "
                    "AND search_vector @@ $1::tsquery",
                    query,
                )
                await conn.execute(SQL_BEGIN_CUSTOM)  # as ThreadSearch plans it
                plan = await conn.fetch(
                    f"EXPLAIN (ANALYZE, BUFFERS) {SQL_SEARCH}",
                    "u0",
                    query,
                    21,
                    None,
                    None,
                    None,
                    HEADLINE_OPTIONS,
                )
                await conn.execute("ROLLBACK")
            out[kind] = {
                **_ms(times),
                "example": queries[0],
                "matching_items_of_the_user": matches,
                "plan": [r[0] for r in plan],
            }
    finally:
        await pool.close()
    return out


async def _bench(server: PgServer, settings: Settings, writes_only: bool) -> dict[str, Any]:
    base = await server.create_database("ckpg_searchbench")
    head = await server.create_database("ckpg_searchbench")
    try:
        await asyncio.to_thread(migrate, base, "0004")
        await asyncio.to_thread(migrate, head)
        writes = await bench_writes(base, head, settings)
        print(f"write path: {json.dumps(writes)}", flush=True)
        await server.drop_database(head)
        if writes_only:
            return {"write_path": writes, "migration_1m": {}, "queries": {}}
        loaded = await load(base)
        print(f"loaded 1,000,000 items at 0004 in {loaded:.0f} s", flush=True)
        migration = await migrate_under_writes(base, settings)
        migration["load_s"] = round(loaded, 1)
        print(f"migration: {json.dumps(migration)}", flush=True)
        queries = await bench_queries(base, settings)
    finally:
        await server.drop_database(base)
    return {"write_path": writes, "migration_1m": migration, "queries": queries}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Everything; ``python -m bench.search_bench writes`` measures only the write path."""
    writes_only = (argv or [])[:1] == ["writes"]
    started = time.perf_counter()
    with postgres_server() as server:
        settings = Settings(database_url=server.url_for("postgres"))
        res = asyncio.run(_bench(server, settings, writes_only))
        res["meta"] = {"server": describe(server), "total_s": round(time.perf_counter() - started)}
    for kind, q in res["queries"].items():
        print(
            f"{kind:<20} p50 {q['p50_ms']:>7} ms  p95 {q['p95_ms']:>7} ms  "
            f"({q['matching_items_of_the_user']} matching items)"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / ("search_writes.json" if writes_only else "search.json")
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"search benchmark: {res['meta']['total_s']} s; figures in {path}")
    return res


if __name__ == "__main__":
    run(sys.argv[1:])
