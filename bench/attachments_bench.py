"""Attachment benchmark: file bytes through the HTTP endpoints against raw asyncpg.

A real uvicorn process serves the file endpoints (``app.files.routes``) on loopback, on a fresh migrated
database of the same PostgreSQL the tests use. Two parts:

* **throughput**: upload (``POST /files``, multipart) and download (``GET /files/{id}``) of a
  10 MiB file, against one raw asyncpg ``INSERT`` / ``SELECT`` of the same bytes into a plain
  ``bytea`` table on the same server. Rounds alternate sides; we quote medians and the ratio
  raw time / HTTP time (1.0 = as fast as the driver alone; target >= 0.5);
* **memory**: a fresh server process, warmed with one small upload, then ten concurrent 10 MiB
  uploads; psutil samples the server's RSS every few milliseconds. The figure is the peak
  growth over the idle RSS (the interpreter and libraries are there before any upload);
  target: below 4x one file.

The server is the service itself (``app.main:create_app``: JWT authentication, middleware,
the ``/files`` router); the client sends HS256 tokens signed with the benchmark's own secret.

``python -m bench.attachments_bench`` runs it; results go to ``bench/results/attachments.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import jwt
import psutil

from app.files.store import CHUNK_SIZE
from app.settings import PROJECT_ROOT
from bench import RESULTS_DIR
from tests.harness.pg import PgServer, describe, migrate, postgres_server

MiB = 1024 * 1024
FILE_BYTES = 10 * MiB
ROUNDS = 7
WARMUP = 1
CONCURRENT = 10
RATIO_TARGET = 0.5
MEMORY_TARGET_FILES = 4.0
SAMPLE_EVERY = 0.003


# --- the server process -------------------------------------------------------------------


JWT_SECRET = secrets.token_urlsafe(48)


def _auth(user: str) -> dict[str, str]:
    now = int(time.time())
    token = jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, JWT_SECRET, "HS256")
    return {"Authorization": f"Bearer {token}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def uvicorn_process(
    database_url: str, data_dir: str, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[str, psutil.Process]]:
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DATA_DIR": data_dir,
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "MAX_UPLOAD_BYTES": str(FILE_BYTES + MiB),
        "JWT_SECRET": JWT_SECRET,
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT_PER_MINUTE": "100000000",  # limiter runs, never refuses
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=PROJECT_ROOT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError("the benchmark server exited during startup")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the benchmark server did not start")
            time.sleep(0.1)
        yield base, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the two sides ------------------------------------------------------------------------


def _payload() -> bytes:
    """A PDF as far as the content check goes (``%PDF-``), random after that (incompressible)."""
    return b"%PDF-1.7\n" + os.urandom(FILE_BYTES - 9)


async def _http_upload(client: httpx.AsyncClient, data: bytes, user: str = "bench") -> str:
    r = await client.post(
        "/files",
        files={"file": ("bench.pdf", data, "application/pdf")},
        headers=_auth(user),
    )
    r.raise_for_status()
    attachment_id: str = r.json()["id"]
    return attachment_id


async def _http_download(client: httpx.AsyncClient, attachment_id: str) -> int:
    n = 0
    async with client.stream("GET", f"/files/{attachment_id}", headers=_auth("bench")) as response:
        response.raise_for_status()
        async for chunk in response.aiter_raw():
            n += len(chunk)
    return n


async def _throughput(base: str, dsn: str) -> dict[str, Any]:
    data = _payload()
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS bench_raw_blob (id bigint PRIMARY KEY, data bytea NOT NULL)"
    )
    times: dict[str, list[float]] = {k: [] for k in ("http_up", "http_down", "raw_up", "raw_down")}
    try:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            for rnd in range(WARMUP + ROUNDS):
                order = ("http", "raw") if rnd % 2 == 0 else ("raw", "http")
                sample: dict[str, float] = {}
                for side in order:
                    if side == "http":
                        t0 = time.perf_counter()
                        attachment_id = await _http_upload(client, data)
                        t1 = time.perf_counter()
                        got = await _http_download(client, attachment_id)
                        t2 = time.perf_counter()
                        assert got == len(data), got
                        sample["http_up"], sample["http_down"] = t1 - t0, t2 - t1
                        await client.delete(f"/files/{attachment_id}", headers=_auth("bench"))
                    else:
                        t0 = time.perf_counter()
                        await conn.execute(
                            "INSERT INTO bench_raw_blob (id, data) VALUES ($1, $2)", rnd, data
                        )
                        t1 = time.perf_counter()
                        back = await conn.fetchval(
                            "SELECT data FROM bench_raw_blob WHERE id = $1", rnd
                        )
                        t2 = time.perf_counter()
                        assert len(back) == len(data)
                        del back
                        sample["raw_up"], sample["raw_down"] = t1 - t0, t2 - t1
                        await conn.execute("DELETE FROM bench_raw_blob WHERE id = $1", rnd)
                if rnd >= WARMUP:
                    for k, v in sample.items():
                        times[k].append(v)
    finally:
        await conn.execute("DROP TABLE IF EXISTS bench_raw_blob")
        await conn.close()

    med = {k: statistics.median(v) for k, v in times.items()}
    mib = FILE_BYTES / MiB
    out: dict[str, Any] = {
        "file_mib": mib,
        "rounds": ROUNDS,
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "mib_per_second": {k: round(mib / v, 1) for k, v in med.items()},
        "all_seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
    out["ratio_upload"] = round(med["raw_up"] / med["http_up"], 3)
    out["ratio_download"] = round(med["raw_down"] / med["http_down"], 3)
    out["target_ratio"] = RATIO_TARGET
    out["meets_target"] = min(out["ratio_upload"], out["ratio_download"]) >= RATIO_TARGET
    return out


class _Sampler:
    """Samples a process's RSS in a thread until stopped; keeps the peak."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
                self.samples += 1
            time.sleep(SAMPLE_EVERY)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _memory(base: str, proc: psutil.Process) -> dict[str, Any]:
    payloads = [_payload() for _ in range(CONCURRENT)]
    async with httpx.AsyncClient(
        base_url=base, timeout=300, limits=httpx.Limits(max_connections=CONCURRENT)
    ) as client:
        # warm-up: import paths, prepared statements, pool connections, allocator arenas
        warm = await _http_upload(client, b"%PDF-1.7\n" + os.urandom(CHUNK_SIZE * 3))
        await _http_download(client, warm)
        await asyncio.sleep(0.5)
        idle = proc.memory_info().rss
        with _Sampler(proc) as sampler:
            t0 = time.perf_counter()
            ids = await asyncio.gather(
                *(_http_upload(client, p, user=f"u{i}") for i, p in enumerate(payloads))
            )
            elapsed = time.perf_counter() - t0
        assert len(set(ids)) == CONCURRENT
    growth = sampler.peak - idle
    return {
        "concurrent_uploads": CONCURRENT,
        "file_mib": FILE_BYTES / MiB,
        "idle_rss_mib": round(idle / MiB, 1),
        "peak_rss_mib": round(sampler.peak / MiB, 1),
        "peak_growth_mib": round(growth / MiB, 1),
        "growth_in_files": round(growth / FILE_BYTES, 2),
        "target_files": MEMORY_TARGET_FILES,
        "meets_target": growth < MEMORY_TARGET_FILES * FILE_BYTES,
        "rss_samples": sampler.samples,
        "wall_seconds": round(elapsed, 2),
        "chunk_kib": CHUNK_SIZE // 1024,
    }


def run() -> dict[str, Any]:
    started = time.perf_counter()
    with postgres_server() as pg, tempfile.TemporaryDirectory(prefix="ckpg-att-bench-") as tmp:
        url = asyncio.run(pg.create_database("ckpg_bench_att"))
        try:
            migrate(url)
            with uvicorn_process(url, tmp) as (base, _proc):
                throughput = asyncio.run(_throughput(base, PgServer.dsn(url)))
            with uvicorn_process(url, tmp) as (base, proc):
                memory = asyncio.run(_memory(base, proc))
        finally:
            asyncio.run(pg.drop_database(url))
        where = describe(pg)
    res = {
        "throughput": throughput,
        "memory": memory,
        "meta": {
            "postgres": where,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "total_s": round(time.perf_counter() - started, 1),
        },
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "attachments.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    t, m = throughput, memory
    print("\nattachments benchmark (10 MiB file, real uvicorn on loopback)")
    print(
        f"  upload:   HTTP {t['mib_per_second']['http_up']} MiB/s, raw asyncpg "
        f"{t['mib_per_second']['raw_up']} MiB/s -> ratio {t['ratio_upload']} (target >= {RATIO_TARGET})"
    )
    print(
        f"  download: HTTP {t['mib_per_second']['http_down']} MiB/s, raw asyncpg "
        f"{t['mib_per_second']['raw_down']} MiB/s -> ratio {t['ratio_download']}"
    )
    print(
        f"  memory:   {CONCURRENT} concurrent uploads: RSS {m['idle_rss_mib']} -> peak "
        f"{m['peak_rss_mib']} MiB, growth {m['peak_growth_mib']} MiB = {m['growth_in_files']}x "
        f"one file (target < {MEMORY_TARGET_FILES}x)"
    )
    print(f"  figures in {path} ({res['meta']['total_s']} s)")
    return res


if __name__ == "__main__":
    run()
    sys.exit(0)
