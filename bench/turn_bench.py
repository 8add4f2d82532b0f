"""Server CPU per turn: chatkit-pg against the seeds' design running the same scripted agent
(issue 21: <= 1.15x), with and without resumable replies, for short and long turns.

Two uvicorn processes (1 worker, uvloop, httptools), pinned to the same CPU when there are two:

* **seed** (``bench.seed_app``): the SDK's own ``ChatKitServer`` over an in-memory dict store,
  its ``respond`` running an Agents SDK agent through ``stream_agent_response``, behind a FastAPI
  route with a PyJWT check: no database at all;
* **chatkit-pg** (``bench.soak_app``: the real app over PostgreSQL, limiter and stream leases
  on), measured twice: *plain*, and *resumable* (``X-Chatkit-Resumable: true``: each reply
  detached into a run, its events logged in batches).

Both run the soak's scripted model (``bench.soak_app.SoakModel``): numbered deltas every
``INTERVAL_MS``, paced as a model streams, so each delta is its own write. A batch is
``WORKERS`` concurrent clients (keep-alive, raw HTTP/1.1) each taking ``TURNS[n]`` turns of
``n`` deltas in a conversation (``threads.create``, then ``threads.add_user_message`` on the
same thread, as the soak does); the figure is the server's CPU (``psutil``, user + system) over
the batch divided by its turns, all in (HTTP, auth, store, agent, SSE, and the run log for
the resumable side). Rounds interleave the sides, their order alternating; medians over rounds,
ratios paired by round. PostgreSQL's backends' CPU for chatkit-pg is reported alongside.

    .venv/bin/python -m bench.turn_bench       (or: python -m bench turns)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from typing import Any

from bench import RESULTS_DIR
from bench import httpload as load
from tests.harness.pg import PgServer, describe, migrate, postgres_server

DELTAS = (20, 400)
TURNS = {20: 8, 400: 2}  # per worker and batch
WORKERS = 10
INTERVAL_MS = 5
ROUNDS = 5
TARGET_RATIO = 1.15
SIDES = ("seed", "plain", "resumable")
RESUMABLE = b"X-Chatkit-Resumable: true"


def request(
    op: str,
    deltas: int,
    thread: str | None,
    token: str,
    resumable: bool,
    interval_ms: int = INTERVAL_MS,
) -> bytes:
    text = f"soak deltas={deltas} interval_ms={interval_ms} tag=t{time.monotonic_ns()}"
    params: dict[str, Any] = {"input": load.user_input(text)}
    if thread is not None:
        params["thread_id"] = thread
    raw = load.chatkit(op, params, token)
    if resumable:
        raw = raw.replace(b"\r\n\r\n", b"\r\n" + RESUMABLE + b"\r\n\r\n", 1)
    return raw


def created_thread(body: bytes) -> str:
    for block in body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: ") and b'"thread.created"' in line:
                return str(json.loads(line[6:])["thread"]["id"])
    raise RuntimeError(f"no thread.created in {body[:300]!r}")


async def conversation(
    port: int,
    token: str,
    deltas: int,
    turns: int,
    resumable: bool,
    interval_ms: int = INTERVAL_MS,
) -> None:
    conn = await load.Connection.open(port)
    thread: str | None = None
    try:
        for _ in range(turns):
            op = "threads.create" if thread is None else "threads.add_user_message"
            raw = request(op, deltas, thread, token, resumable, interval_ms)
            status, body = await conn.roundtrip(raw)
            got = body.count(b'"assistant_message.content_part.text_delta"')
            if status != 200 or got != deltas:
                raise RuntimeError(f"bad turn ({op}): {status}, {got} deltas: {body[:300]!r}")
            if resumable and b"\nid: run_" not in b"\n" + body:
                raise RuntimeError("a resumable turn without event ids")
            thread = thread or created_thread(body)
    finally:
        await conn.close()


async def batch(
    server: load.Server, token: str, deltas: int, resumable: bool, pids: list[int]
) -> tuple[float, float]:
    """Server CPU and PostgreSQL backends' CPU per turn, seconds."""
    cpu0, db0 = server.cpu(), load.processes_cpu(pids)
    turns = TURNS[deltas]
    await asyncio.gather(
        *(conversation(server.port, token, deltas, turns, resumable) for _ in range(WORKERS))
    )
    cpu1, db1 = server.cpu(), load.processes_cpu(pids)
    n = WORKERS * turns
    return (cpu1 - cpu0) / n, (db1 - db0) / n


async def measure(servers: dict[str, load.Server], token: str, dsn: str) -> dict[str, Any]:
    # Warm-up: every code path loaded and the pool's connections open before anything counts.
    for side in SIDES:
        server = servers["seed" if side == "seed" else "chatkit-pg"]
        await conversation(server.port, token, 20, 2, side == "resumable")
    pids = await load.backend_pids(dsn)
    rounds: dict[int, dict[str, list[tuple[float, float]]]] = {
        n: {side: [] for side in SIDES} for n in DELTAS
    }
    for r in range(ROUNDS):
        order = SIDES if r % 2 == 0 else tuple(reversed(SIDES))
        for deltas in DELTAS if r % 2 == 0 else tuple(reversed(DELTAS)):
            for side in order:
                server = servers["seed" if side == "seed" else "chatkit-pg"]
                got = await batch(server, token, deltas, side == "resumable", pids)
                rounds[deltas][side].append(got)
        print(f"  round {r + 1}/{ROUNDS} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    out: dict[str, Any] = {}
    for deltas, sides in rounds.items():
        row: dict[str, Any] = {}
        for side, values in sides.items():
            cpu = [v[0] for v in values]
            row[side] = {
                "cpu_ms_per_turn_median": round(statistics.median(cpu) * 1e3, 2),
                "cpu_us_per_delta_median": round(statistics.median(cpu) / deltas * 1e6, 1),
                "cpu_ms_per_turn_rounds": [round(x * 1e3, 2) for x in cpu],
            }
            if side != "seed":
                db = statistics.median(v[1] for v in values)
                row[side]["db_cpu_ms_per_turn_median"] = round(db * 1e3, 2)
        for side in ("plain", "resumable"):
            pairs = zip(sides[side], sides["seed"], strict=True)
            row[f"ratio_{side}_over_seed"] = round(
                statistics.median(a[0] / b[0] for a, b in pairs), 3
            )
        pairs = zip(sides["resumable"], sides["plain"], strict=True)
        row["ratio_resumable_over_plain"] = round(
            statistics.median(a[0] / b[0] for a, b in pairs), 3
        )
        row["target_met"] = {
            side: row[f"ratio_{side}_over_seed"] <= TARGET_RATIO for side in ("plain", "resumable")
        }
        out[f"{deltas}_deltas"] = row
    return out


def placement() -> int | None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    os.sched_setaffinity(0, {cpus[1]})  # the client on the other CPU
    return cpus[0]


async def main() -> dict[str, Any]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    with postgres_server() as pg:
        url = await pg.create_database("ckpg_turn_bench")
        try:
            await asyncio.to_thread(migrate, url)
            dsn = PgServer.dsn(url)
            cpu = placement()
            env = load.app_env(url, "postgres")
            with (
                load.server_process(
                    "turn-chatkit-pg", "bench.soak_app:create_soak_app", env, cpu
                ) as ours,
                load.server_process(
                    "turn-seed", "bench.seed_app:create_seed_app", load.baseline_env(dsn), cpu
                ) as seed,
            ):
                figures = await measure(
                    {"chatkit-pg": ours, "seed": seed}, load.bearer_token(), dsn
                )
        finally:
            await pg.drop_database(url)
        postgres = describe(pg)
    return {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "postgres": postgres,
            "server_cpu": cpu,
            "workers": WORKERS,
            "turns_per_worker_and_batch": TURNS,
            "interval_ms": INTERVAL_MS,
            "rounds": ROUNDS,
            "loadavg_at_start": load_at_start,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "total_s": round(time.perf_counter() - started, 1),
        },
        "target_ratio_max": TARGET_RATIO,
        **figures,
    }


def run() -> dict[str, Any]:
    result = asyncio.run(main())
    print(json.dumps(result, indent=2))
    (RESULTS_DIR / "turns.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run()
