"""Server benchmark: the whole HTTP stack, one uvicorn worker (uvloop, httptools) on loopback.

Two questions, each answered against baselines measured in the same run:

1. **Read throughput** (``bench.server_reads``). ``threads.list`` and ``items.list`` (pages of
   20, JWT auth, request parsing, ownership checks, PostgreSQL) against three baselines, each
   its own uvicorn process with the same settings: the *floor* (JWT check + one asyncpg query
   + the stored JSON as the page; target chatkit-pg >= 0.6x), the *tutorial* design (the SDK's
   ``ChatKitServer`` over an in-memory dict store; target >= 5x) and a *bare* FastAPI route in
   chatkit-pg's process answering the same bytes. Requests per second and p99 latency at a
   fixed concurrency, from a small raw HTTP/1.1 keep-alive client (``bench.httpload``, so the
   client is not the bottleneck). Data: 30 threads of 10 items for one user (the thread
   ``items.list`` reads holds 30, so both pages are full).
2. **CPU per streamed text delta.** ``threads.create`` replies of 200 and of 2000 one-word
   deltas from a scripted model; the server process's CPU time (``psutil``) per reply, and the
   slope between the two lengths, i.e. the cost of one more delta end to end (agents runner,
   ChatKit conversion, SSE). The same server with an in-memory store is the baseline: the
   Postgres store is written per item, never per delta, so the ratio should be ~1 (target
   <= 1.10). The CPU of the PostgreSQL backends serving the app is reported alongside.

Placement: the servers are pinned to CPU 0 and this client to CPU 1 (when there are two
CPUs), PostgreSQL runs where the OS puts it. Rounds alternate the order of the sides; the
figures quoted are medians over rounds. Results go to ``bench/results/server.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
from typing import Any

import uvloop

from bench import RESULTS_DIR
from bench import server_reads as reads_
from bench.httpload import (
    CONCURRENCY,
    POOL_SIZE,
    Connection,
    Server,
    app_env,
    backend_pids,
    baseline_env,
    bearer_token,
    chatkit,
    processes_cpu,
    server_process,
    user_input,
)
from tests.harness.pg import PgServer, describe, migrate, postgres_server

SHORT, LONG = 200, 2000
STREAMS = {SHORT: 20, LONG: 5}
CPU_ROUNDS = 7

TARGET_DELTA_RATIO = 1.10


# --- part 2: CPU per streamed delta ---------------------------------------------------------


async def stream_batch(
    server: Server, token: str, deltas: int, count: int, db: list[int]
) -> tuple[float, float]:
    """Server CPU and its PostgreSQL backends' CPU per reply of ``deltas`` deltas."""
    conn = await Connection.open(server.port)
    request = chatkit("threads.create", {"input": user_input(f"deltas:{deltas}")}, token)
    # One reply first so the pool's connections exist before we read their CPU.
    await conn.roundtrip(request)
    cpu0, db0 = server.cpu(), processes_cpu(db)
    for _ in range(count):
        status, body = await conn.roundtrip(request)
        if status != 200 or body.count(b'"assistant_message.content_part.text_delta"') != deltas:
            raise RuntimeError(f"bad stream: {status} {body[:300]!r}")
    cpu1, db1 = server.cpu(), processes_cpu(db)
    await conn.close()
    return (cpu1 - cpu0) / count, (db1 - db0) / count


async def delta_cost(servers: dict[str, Server], token: str, dsn: str) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    db_pids: dict[str, list[int]] = {}
    for name, server in servers.items():  # warm up both, then find the pool's backends
        await stream_batch(server, token, SHORT, 3, [])
        db_pids[name] = await backend_pids(dsn) if name == "postgres" else []
    for r in range(CPU_ROUNDS):
        names = list(servers) if r % 2 == 0 else list(reversed(servers))
        # The two stores' batches of one length run back to back, so that both see the same
        # machine (a shared VM drifts); the lengths alternate too.
        batches: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in names}
        for deltas in (SHORT, LONG) if r % 2 == 0 else (LONG, SHORT):
            for name in names:
                pids = await backend_pids(dsn) if name == "postgres" else []
                batches[name][deltas] = await stream_batch(
                    servers[name], token, deltas, STREAMS[deltas], pids
                )
        for name in names:
            (short, short_db), (long, long_db) = batches[name][SHORT], batches[name][LONG]
            slope = (long - short) / (LONG - SHORT)
            rounds[name].append(
                {
                    "slope_us_per_delta": slope * 1e6,
                    "intercept_ms": (short - slope * SHORT) * 1e3,
                    "cpu_ms_per_reply_200": short * 1e3,
                    "cpu_ms_per_reply_2000": long * 1e3,
                    "db_cpu_ms_per_reply_200": short_db * 1e3,
                    "db_cpu_ms_per_reply_2000": long_db * 1e3,
                    "slope_with_db_us_per_delta": ((long + long_db) - (short + short_db))
                    / (LONG - SHORT)
                    * 1e6,
                }
            )

    def med(name: str, key: str) -> float:
        return round(statistics.median(x[key] for x in rounds[name]), 3)

    out: dict[str, Any] = {
        name: {key + "_median": med(name, key) for key in rounds[name][0]}
        | {"rounds": [{k: round(v, 3) for k, v in x.items()} for x in rounds[name]]}
        for name in servers
    }
    pg, mem = out["postgres"], out["memory"]
    # The headline ratio pairs the two stores round by round (measured back to back), which
    # cancels the drift of a shared machine better than a ratio of two separate medians.
    out["ratio_of_slope_medians"] = round(
        pg["slope_us_per_delta_median"] / mem["slope_us_per_delta_median"], 3
    )
    out["ratio_slope"] = round(
        statistics.median(
            a["slope_us_per_delta"] / b["slope_us_per_delta"]
            for a, b in zip(rounds["postgres"], rounds["memory"], strict=True)
        ),
        3,
    )
    out["ratio_slope_with_db"] = round(
        pg["slope_with_db_us_per_delta_median"] / mem["slope_us_per_delta_median"], 3
    )
    out["ratio_per_reply_200"] = round(
        pg["cpu_ms_per_reply_200_median"] / mem["cpu_ms_per_reply_200_median"], 3
    )
    return out


# --- driver --------------------------------------------------------------------------------


def _placement() -> tuple[int | None, int | None]:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None, None
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


async def _bench(url: str, pg: PgServer) -> dict[str, Any]:
    server_cpu, client_cpu = _placement()
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    bearer = bearer_token()
    dsn = PgServer.dsn(url)
    started = time.perf_counter()
    app = "bench.server_app:create_bench_app"
    with (
        server_process("postgres", app, app_env(url, "postgres"), server_cpu) as pg_server,
        server_process("memory", app, app_env(url, "memory"), server_cpu) as mem_server,
    ):
        thread_id = await reads_.seed(pg_server.port, bearer)
        t_seed = time.perf_counter() - started
        # The baselines start after the seeding: the tutorial copies the data at startup.
        with (
            server_process(
                "floor", "bench.floor_app:create_floor_app", baseline_env(dsn), server_cpu
            ) as floor,
            server_process(
                "tutorial", "bench.tutorial_app:create_tutorial_app", baseline_env(dsn), server_cpu
            ) as tutorial,
        ):
            reads = await reads_.throughput(pg_server, floor, tutorial, bearer, thread_id, dsn)
        t_reads = time.perf_counter() - started
        deltas = await delta_cost({"postgres": pg_server, "memory": mem_server}, bearer, dsn)
    return {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "placement": {"servers_cpu": server_cpu, "client_cpu": client_cpu},
            "postgres": describe(pg),
            "server": "uvicorn, 1 worker, uvloop + httptools, JSON logs at INFO",
            "client": "raw HTTP/1.1 keep-alive over asyncio streams on uvloop",
            "baselines": {
                "floor": "bench.floor_app: bare ASGI, PyJWT decode per request, one query on a "
                "plain asyncpg pool, stored JSON joined into the page",
                "tutorial": "bench.tutorial_app: the SDK's ChatKitServer.process over "
                "bench.memory_store behind a FastAPI route, PyJWT decode per request",
                "bare": "a FastAPI route in chatkit-pg's process answering the same bytes",
            },
            "db_pool_size": POOL_SIZE,
            "concurrency": CONCURRENCY,
            "load_seconds": reads_.LOAD_SECONDS,
            "throughput_rounds": reads_.ROUNDS,
            "data": {
                "threads": reads_.THREADS,
                "items_per_thread": reads_.ITEMS,
                "items_in_listed_thread": reads_.BIG_ITEMS,
            },
            "page_rows": reads_.PAGE,
            "deltas": [SHORT, LONG],
            "streams_per_batch": {str(k): v for k, v in STREAMS.items()},
            "cpu_rounds": CPU_ROUNDS,
            "phase_s": {
                "seed": round(t_seed, 1),
                "throughput": round(t_reads - t_seed, 1),
                "deltas": round(time.perf_counter() - started - t_reads, 1),
            },
        },
        "throughput": reads,
        "delta_cpu": deltas,
        "targets": {
            "chatkit_over_floor_min": reads_.TARGETS["floor"],
            "chatkit_over_tutorial_min": reads_.TARGETS["tutorial"],
            "postgres_over_memory_per_delta_max": TARGET_DELTA_RATIO,
        },
        "verdict": reads_.verdict(reads)
        | {"per_delta": deltas["ratio_slope"] <= TARGET_DELTA_RATIO},
    }


def _report(res: dict[str, Any]) -> None:
    print("\nserver benchmark (one uvicorn worker per side on loopback; medians over rounds)")
    print(f"  PostgreSQL: {res['meta']['postgres']['kind']}; concurrency {CONCURRENCY}")
    reads_.report(res["throughput"])
    d = res["delta_cpu"]
    pg, mem = d["postgres"], d["memory"]
    print(
        f"  CPU per streamed delta: postgres store {pg['slope_us_per_delta_median']:.1f} us, "
        f"in-memory store {mem['slope_us_per_delta_median']:.1f} us; ratio (paired median) "
        f"{d['ratio_slope']:.3f}, of the medians {d['ratio_of_slope_medians']:.3f} "
        f"(target <= {TARGET_DELTA_RATIO})"
    )
    print(
        f"    incl. PostgreSQL backends: {pg['slope_with_db_us_per_delta_median']:.1f} us/delta; "
        f"per reply of {SHORT}: {pg['cpu_ms_per_reply_200_median']:.1f} ms + "
        f"{pg['db_cpu_ms_per_reply_200_median']:.1f} ms in PostgreSQL vs "
        f"{mem['cpu_ms_per_reply_200_median']:.1f} ms in memory"
    )
    print(f"  verdict: {res['verdict']}")


def run() -> dict[str, Any]:
    """Fresh migrated database, the server processes, the two measurements; prints and saves."""
    started = time.perf_counter()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with postgres_server() as server:
        url = asyncio.run(server.create_database("ckpg_server_bench"))
        try:
            migrate(url)
            # The client on uvloop too, so that it spends less CPU per request than any server
            # side (client_cpu_us_per_request_median): a client at its core's limit would cap
            # every side alike and flatten the ratios.
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                res = runner.run(_bench(url, server))
        finally:
            asyncio.run(server.drop_database(url))
    res["meta"]["total_s"] = round(time.perf_counter() - started, 1)
    _report(res)
    path = RESULTS_DIR / "server.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"server benchmark: {res['meta']['total_s']} s in all; figures in {path}")
    return res


if __name__ == "__main__":
    run()
