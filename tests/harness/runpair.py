"""Two backend processes on one database for the resumable replies' suites (docs/runs.md):
their environment, a reply started and held at a delta (the paced model in lockstep), resume
headers, and what a whole reply looks like. The fixtures ``backends`` and ``two`` are in
tests/http/conftest.py."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx

from tests.harness.deploy import Backend, Lockstep, pace_prompt, threads_create_body
from tests.harness.runs import RESUMABLE, Event, auth, delta_indexes, read_events, seqs

DEADLINE = 60  # seconds; only against hangs
ORIGIN = "https://app.example"
DELTAS = 6
# A live process's runs must never look dead, however loaded the machine: a heartbeat every
# 0.3 s and a run declared lost only after 6 s of silence (20 heartbeats missed; the default is
# 5 s with a heartbeat every second). With 2 s, a loaded machine once made a live run look lost.
RUN_ENV = {
    "RUN_HEARTBEAT_SECONDS": "0.3",
    "RUN_DEAD_AFTER_SECONDS": "6",
    "RUN_POLL_SECONDS": "0.05",
    "STREAM_LEASE_SECONDS": "3",
    "MAX_STREAMS_PER_USER": "2",
    "CORS_ORIGINS": ORIGIN,
}


def backend_env(folder: Path, base: Path) -> dict[str, str]:
    return {
        **RUN_ENV,
        "DATA_DIR": str(folder / "data"),
        "ATTACHMENT_SIGNING_SECRET": "runs-tests-signing-secret-" + "r" * 20,
        "PYTHONDONTWRITEBYTECODE": "",
        "PYTHONPYCACHEPREFIX": str(base / "chatkit-pg-pycache"),
    }


def start_all(backends: list[Backend], folder: Path, name: str) -> None:
    """Side by side: each start is mostly imports."""
    with ThreadPoolExecutor(len(backends)) as pool:
        futures = [pool.submit(b.start, folder / f"{name}{i}.log") for i, b in enumerate(backends)]
        for future in futures:
            future.result()


@dataclass
class Pair:
    a: httpx.AsyncClient
    b: httpx.AsyncClient
    dsn: str
    backends: list[Backend]

    def logs(self) -> str:
        return "\n".join(f"--- backend {i} ---\n{b.log()}" for i, b in enumerate(self.backends))


def new_user() -> str:
    return f"runs-{secrets.token_hex(4)}"


async def start_reply(
    client: httpx.AsyncClient, user: str, lockstep: Lockstep, stop_at: int
) -> tuple[str, list[Event]]:
    """An opted-in ``threads.create`` on ``client``, read until delta ``stop_at`` (held there,
    unacknowledged); the connection is closed on return. (run_id, events read)."""
    body = threads_create_body(pace_prompt(DELTAS, 0, lockstep=lockstep))
    headers = {**auth(user), **RESUMABLE, "Accept": "text/event-stream", "Origin": ORIGIN}
    async with client.stream("POST", "/chatkit", json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        run_id = response.headers["x-chatkit-run"]
        # A browser's script may read it.
        exposed = response.headers["access-control-expose-headers"].lower().split(", ")
        assert "x-chatkit-run" in exposed
        events = await read_events(response, lockstep, stop_at_delta=stop_at)
    return run_id, events


def resume_headers(user: str, run_id: str, last: int) -> dict[str, str]:
    return {**auth(user), "Last-Event-ID": f"{run_id}:{last}", "Accept": "text/event-stream"}


def assert_whole_reply(events: list[Event], run_id: str) -> None:
    """Every event of one run exactly once, in order: ids 1..n without a gap, each delta once."""
    assert {e.run_id for e in events} == {run_id}
    assert seqs(events) == list(range(1, len(events) + 1))
    assert delta_indexes(events) == list(range(DELTAS))


async def stored_types(dsn: str, user: str, thread_id: str) -> list[tuple[str, str]]:
    """The thread's items as stored, hidden ones too: (type, data)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT type, data::text AS data FROM chatkit_items "
            "WHERE user_id = $1 AND thread_id = $2 ORDER BY created_at, seq",
            user,
            thread_id,
        )
    finally:
        await conn.close()
    return [(r["type"], r["data"]) for r in rows]
