"""Instructions per delta (callgrind): the turn benchmark's sides (``bench.turn_bench``) counted
in instructions rather than CPU seconds, which the machine's load does not move.

Each side's uvicorn process runs under ``valgrind --tool=callgrind --instr-atstart=no`` (slow to
start: a minute or two each); after a warm-up, instrumentation is switched on
(``callgrind_control -i on``) for one batch of ``SHORT``-delta turns and one of ``LONG``-delta
turns (one client, deltas ``INTERVAL_MS`` apart so that the slowed server keeps up and every
delta is its own write), each batch dumped and counted (``callgrind_annotate``). The difference
of the two batches per delta is the per-delta cost; the rest is the per-turn cost. User-space
instructions only: system time (the socket writes) is not in them.

    .venv/bin/python -m bench.turn_instructions     (needs valgrind; ~8 minutes)
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from app.settings import PROJECT_ROOT
from bench import RESULTS_DIR
from bench import httpload as load
from bench.turn_bench import conversation
from tests.harness.pg import PgServer, migrate, postgres_server

INTERVAL_MS = 40
SHORT, LONG = 20, 200
TURNS = 2
SIDES = ("seed", "plain", "resumable")
OUT = RESULTS_DIR / "callgrind"


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def instructions(path: str) -> int:
    out = subprocess.run(["callgrind_annotate", path], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "PROGRAM TOTALS" in line:
            return int(line.split()[0].replace(",", ""))
    raise RuntimeError(f"no totals in {path}")


async def side(name: str, factory: str, env_extra: dict[str, str], token: str) -> dict[int, float]:
    """Instructions per turn of ``SHORT`` and ``LONG`` deltas."""
    port = load._free_port()
    prefix = str(OUT / name)
    for old in glob.glob(prefix + ".*"):
        os.remove(old)
    cmd = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={prefix}.%p",
        sys.executable, "-m", "uvicorn", factory, "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JWT_", "OPENAI_", "MCP_", "PRODUCTION", "CORS_", "AGENT_"))
    } | env_extra
    log = Path(prefix + ".log")
    with log.open("wb") as log_file:
        process = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=log_file)
        try:
            load.wait_listening(process, port, f"the {name} server", log, seconds=600)
            resumable = name == "resumable"
            await conversation(port, token, SHORT, 3, resumable, INTERVAL_MS)  # warm-up
            per_turn: dict[int, float] = {}
            for deltas in (SHORT, LONG):
                control(process.pid, "-i", "on")
                await conversation(port, token, deltas, TURNS, resumable, INTERVAL_MS)
                control(process.pid, "-i", "off")
                before = set(glob.glob(f"{prefix}.{process.pid}*"))
                control(process.pid, "-d")
                control(process.pid, "-z")
                dump = sorted(set(glob.glob(f"{prefix}.{process.pid}*")) - before)[-1]
                per_turn[deltas] = instructions(dump) / TURNS
                os.remove(dump)
                print(
                    f"  {name}: {per_turn[deltas] / 1e6:.1f} M instructions per {deltas}-delta turn"
                )
            return per_turn
        finally:
            process.terminate()
            process.wait(120)


async def main() -> dict[str, Any]:
    OUT.mkdir(parents=True, exist_ok=True)
    token = load.bearer_token()
    counts: dict[str, dict[int, float]] = {}
    with postgres_server() as pg:
        url = await pg.create_database("ckpg_turn_instructions")
        try:
            await asyncio.to_thread(migrate, url)
            for name in SIDES:
                if name == "seed":
                    env = load.baseline_env(PgServer.dsn(url))
                    factory = "bench.seed_app:create_seed_app"
                else:
                    env, factory = load.app_env(url, "postgres"), "bench.soak_app:create_soak_app"
                counts[name] = await side(name, factory, env, token)
        finally:
            await pg.drop_database(url)
    out: dict[str, Any] = {"meta": {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
    for name, per_turn in counts.items():
        per_delta = (per_turn[LONG] - per_turn[SHORT]) / (LONG - SHORT)
        out[name] = {
            "instructions_per_delta": round(per_delta),
            "instructions_per_turn_fixed": round(per_turn[SHORT] - SHORT * per_delta),
        }
    seed = out["seed"]["instructions_per_delta"]
    for name in ("plain", "resumable"):
        out[f"per_delta_{name}_over_seed"] = round(out[name]["instructions_per_delta"] / seed, 3)
    return out


def run() -> dict[str, Any]:
    result = asyncio.run(main())
    print(json.dumps(result, indent=2))
    (RESULTS_DIR / "turn_instructions.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run()
