"""CPU per streamed delta with the run log (docs/runs.md) against the same server without it.

One chatkit-pg process (``bench.server_app`` over PostgreSQL, uvicorn, uvloop, httptools) streams
``threads.create`` replies of 200 and 2000 one-word deltas from the scripted model, alternately
with ``X-Chatkit-Resumable: true`` (the reply detached into a run, logged in batches) and
without (today's stream). The server's CPU per reply (``psutil``) and the slope between the two
lengths, i.e. the cost of one more delta; the CPU of its PostgreSQL backends alongside. The
figures are medians over rounds; the ratio pairs the two modes round by round.

    .venv/bin/python -m bench.runs_bench
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
ROUNDS = 5
TARGET_RATIO = 1.15
MODES = ("plain", "resumable")


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


async def measure(server: load.Server, token: str, dsn: str) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for r in range(ROUNDS):
        order = MODES if r % 2 == 0 else tuple(reversed(MODES))
        got: dict[str, dict[int, tuple[float, float]]] = {m: {} for m in MODES}
        for deltas in (SHORT, LONG) if r % 2 == 0 else (LONG, SHORT):
            for mode in order:
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
    pairs = list(zip(rounds["resumable"], rounds["plain"], strict=True))
    out["ratio_slope"] = round(
        statistics.median(a["slope_us_per_delta"] / b["slope_us_per_delta"] for a, b in pairs), 3
    )
    out["ratio_per_reply_200"] = round(
        statistics.median(a["cpu_ms_per_reply_200"] / b["cpu_ms_per_reply_200"] for a, b in pairs),
        3,
    )
    out["target_ratio_max"] = TARGET_RATIO
    return out


async def main() -> dict[str, Any]:
    os.makedirs(RESULTS_DIR, exist_ok=True)  # the server's log goes there
    with postgres_server() as pg:
        url = await pg.create_database("ckpg_durable_runs_bench")
        try:
            await asyncio.to_thread(migrate, url)
            env = load.app_env(url, "postgres")
            with load.server_process(
                "runs", "bench.server_app:create_bench_app", env, None
            ) as server:
                result = await measure(server, load.bearer_token(), PgServer.dsn(url))
        finally:
            await pg.drop_database(url)
    return result


if __name__ == "__main__":
    result = asyncio.run(main())
    print(json.dumps(result, indent=2))
    (RESULTS_DIR / "runs.json").write_text(json.dumps(result, indent=2) + "\n")
