"""CPU per streamed delta with the run log (docs/runs.md) against the in-memory store and
against the same server without the log (issue 21: log on <= 1.15x the in-memory store).

Two chatkit-pg processes (``bench.server_app``, uvicorn, uvloop, httptools): one over the
PostgreSQL store, one over ``bench.memory_store`` (``BENCH_STORE=memory``). They stream
``threads.create`` replies of 200 and 2000 one-word deltas from the scripted model, three sides
interleaved with their order alternating: *resumable* (the PostgreSQL server, with
``X-Chatkit-Resumable: true``: the reply detached into a run, logged in batches), *plain* (the
same server without the opt-in) and *memory* (the in-memory server, without it). The server's
CPU per reply (``psutil``) and the slope between the two lengths, i.e. the cost of one more
delta; the CPU of the PostgreSQL backends alongside. The figures are medians over rounds; the
ratios pair the sides round by round.

    .venv/bin/python -m bench.runs_bench       (or: python -m bench runs)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
from typing import Any

from bench import RESULTS_DIR
from bench import httpload as load
from tests.harness.pg import PgServer, migrate, postgres_server

SHORT, LONG = 200, 2000
STREAMS = {SHORT: 10, LONG: 3}
ROUNDS = 7
TARGET_RATIO = 1.15
MODES = ("memory", "plain", "resumable")  # side -> the server it runs on, and the opt-in
SERVER_OF = {"memory": "memory", "plain": "postgres", "resumable": "postgres"}


def request(deltas: int, token: str, mode: str) -> bytes:
    raw = load.chatkit("threads.create", {"input": load.user_input(f"deltas:{deltas}")}, token)
    if mode == "resumable":
        raw = raw.replace(b"\r\n\r\n", b"\r\nX-Chatkit-Resumable: true\r\n\r\n", 1)
    return raw


async def batch(
    server: load.Server, token: str, deltas: int, mode: str, dsn: str
) -> tuple[float, float]:
    conn = await load.Connection.open(server.port)
    raw = request(deltas, token, mode)
    await conn.roundtrip(raw)
    pids = await load.backend_pids(dsn)
    cpu0, db0 = server.cpu(), load.processes_cpu(pids)
    count = STREAMS[deltas]
    for _ in range(count):
        status, body = await conn.roundtrip(raw)
        if status != 200 or body.count(b'"assistant_message.content_part.text_delta"') != deltas:
            raise RuntimeError(f"bad stream: {status} {body[:300]!r}")
        if mode == "resumable" and b"\nid: run_" not in b"\n" + body:
            raise RuntimeError("the resumable stream has no event ids")
    cpu1, db1 = server.cpu(), load.processes_cpu(pids)
    await conn.close()
    return (cpu1 - cpu0) / count, (db1 - db0) / count


async def measure(servers: dict[str, load.Server], token: str, dsn: str) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for r in range(ROUNDS):
        order = MODES if r % 2 == 0 else tuple(reversed(MODES))
        got: dict[str, dict[int, tuple[float, float]]] = {m: {} for m in MODES}
        for deltas in (SHORT, LONG) if r % 2 == 0 else (LONG, SHORT):
            for mode in order:
                server = servers[SERVER_OF[mode]]
                got[mode][deltas] = await batch(server, token, deltas, mode, dsn)
        for mode in MODES:
            (short, short_db), (long, long_db) = got[mode][SHORT], got[mode][LONG]
            rounds[mode].append(
                {
                    "slope_us_per_delta": (long - short) / (LONG - SHORT) * 1e6,
                    "db_slope_us_per_delta": (long_db - short_db) / (LONG - SHORT) * 1e6,
                    "cpu_ms_per_reply_200": short * 1e3,
                    "db_cpu_ms_per_reply_200": short_db * 1e3,
                }
            )
    out: dict[str, Any] = {
        mode: {k + "_median": round(statistics.median(x[k] for x in rows), 2) for k in rows[0]}
        for mode, rows in rounds.items()
    }
    for a_name, b_name in (("resumable", "memory"), ("plain", "memory"), ("resumable", "plain")):
        pairs = list(zip(rounds[a_name], rounds[b_name], strict=True))
        out[f"ratio_slope_{a_name}_over_{b_name}"] = round(
            statistics.median(a["slope_us_per_delta"] / b["slope_us_per_delta"] for a, b in pairs),
            3,
        )
        out[f"ratio_per_reply_200_{a_name}_over_{b_name}"] = round(
            statistics.median(
                a["cpu_ms_per_reply_200"] / b["cpu_ms_per_reply_200"] for a, b in pairs
            ),
            3,
        )
    out["target_ratio_max"] = TARGET_RATIO
    out["target_met"] = out["ratio_slope_resumable_over_memory"] <= TARGET_RATIO
    out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


async def main() -> dict[str, Any]:
    os.makedirs(RESULTS_DIR, exist_ok=True)  # the server's log goes there
    with postgres_server() as pg:
        url = await pg.create_database("ckpg_durable_runs_bench")
        try:
            await asyncio.to_thread(migrate, url)
            app = "bench.server_app:create_bench_app"
            with (
                load.server_process("runs", app, load.app_env(url, "postgres"), None) as pg_side,
                load.server_process("runs-memory", app, load.app_env(url, "memory"), None) as mem,
            ):
                servers = {"postgres": pg_side, "memory": mem}
                result = await measure(servers, load.bearer_token(), PgServer.dsn(url))
        finally:
            await pg.drop_database(url)
    return result


def run() -> dict[str, Any]:
    result = asyncio.run(main())
    print(json.dumps(result, indent=2))
    (RESULTS_DIR / "runs.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run()
