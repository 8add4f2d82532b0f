"""The server benchmark's tools: a raw HTTP/1.1 keep-alive client, a load loop, and the uvicorn
child processes (the app and its baselines) it measures.

The client is a few lines over asyncio streams rather than an HTTP library so that it is never
the bottleneck; every server runs as its own uvicorn process with the same settings (one worker,
uvloop, httptools, no access log), pinned to the same CPU, so the sides differ only in the app.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import psutil

from app.settings import PROJECT_ROOT
from bench import RESULTS_DIR

SECRET = "server-benchmark-secret-" + "x" * 40
USER = "bench"
ALGORITHM = "HS256"
CONCURRENCY = 16
POOL_SIZE = CONCURRENCY + 4
APP_NAME = "chatkit-pg"  # the app's default application_name, for its backends' CPU


def bearer_token() -> str:
    now = int(time.time())
    claims = {"sub": USER, "iat": now, "exp": now + 24 * 3600}
    return jwt.encode(claims, SECRET, algorithm=ALGORITHM)


# --- a raw HTTP/1.1 client -----------------------------------------------------------------


class Connection:
    """One keep-alive connection; answers are read by Content-Length or chunked encoding."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**22)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def roundtrip(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        status = int((await self.reader.readline()).split(b" ", 2)[1])
        length = None
        chunked = False
        while (line := await self.reader.readline()) != b"\r\n":
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if status in (204, 304):
            return status, b""
        if length is not None:
            return status, await self.reader.readexactly(length)
        if not chunked:
            raise RuntimeError("response without length")
        body = bytearray()
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            if size == 0:
                await self.reader.readline()
                return status, bytes(body)
            body += await self.reader.readexactly(size)
            await self.reader.readexactly(2)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def http_request(method: str, path: str, body: bytes, token: str | None = None) -> bytes:
    head = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if token:
        head.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chatkit(type_: str, params: dict[str, Any], token: str) -> bytes:
    return http_request(
        "POST", "/chatkit", json.dumps({"type": type_, "params": params}).encode(), token
    )


def user_input(text: str) -> dict[str, Any]:
    return {
        "content": [{"type": "input_text", "text": text}],
        "attachments": [],
        "inference_options": {},
    }


async def fetch(port: int, request: bytes) -> tuple[int, bytes]:
    """One request on a fresh connection (uvicorn closes idle keep-alives after 5 s)."""
    conn = await Connection.open(port)
    try:
        return await conn.roundtrip(request)
    finally:
        await conn.close()


# --- server processes ----------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    ps: psutil.Process

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pin(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def app_env(url: str, store: str) -> dict[str, str]:
    """chatkit-pg's settings in the benchmark (``bench.server_app``)."""
    return {
        "DATABASE_URL": url,
        "JWT_SECRET": SECRET,
        "BENCH_STORE": store,
        "THREAD_TITLES": "first_message",
        "LOG_LEVEL": "INFO",
        # More pooled connections than concurrent requests, so that no request waits for one
        # (the floor's pool is the same size).
        "DB_POOL_SIZE": str(POOL_SIZE),
        "DB_MAX_OVERFLOW": "0",
        "DATA_DIR": str(RESULTS_DIR / ".data"),
        # The per-user limiter still runs on every request (its cost is measured) but never
        # refuses: one user sends everything here.
        "RATE_LIMIT_PER_MINUTE": os.environ.get("BENCH_RATE_LIMIT_PER_MINUTE", "100000000"),
        "MAX_STREAMS_PER_USER": "0",
    }


def baseline_env(dsn: str) -> dict[str, str]:
    """What the floor and tutorial baselines read (``bench.floor_app``, ``bench.tutorial_app``)."""
    return {
        "BENCH_DSN": dsn,
        "BENCH_JWT_SECRET": SECRET,
        "BENCH_JWT_ALGORITHM": ALGORITHM,
        "BENCH_USER": USER,
        "BENCH_POOL_SIZE": str(POOL_SIZE),
    }


def wait_listening(
    process: subprocess.Popen[bytes], port: int, what: str, log: Path, seconds: float = 60
) -> None:
    """Until ``process`` accepts connections on ``port``; raises if it exits or takes longer."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start; see {log}") from None
            time.sleep(0.05)


@contextmanager
def server_process(
    name: str, factory: str, env_extra: dict[str, str], cpu: int | None
) -> Iterator[Server]:
    """``factory`` (``module:function``) under uvicorn, as chatkit-pg is served in production:
    one worker, uvloop, httptools; the log goes to ``bench/results/server-<name>.log``."""
    port = _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JWT_", "OPENAI_", "MCP_", "PRODUCTION", "CORS_", "AGENT_"))
    }
    env |= env_extra
    cmd = [
        sys.executable, "-m", "uvicorn", factory, "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    log = RESULTS_DIR / f"server-{name}.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            cmd, cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=log_file, preexec_fn=_pin(cpu)
        )
        try:
            wait_listening(process, port, f"the {name} server", log)
            yield Server(name, port, process, psutil.Process(process.pid))
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def backend_pids(dsn: str, application_name: str = APP_NAME) -> list[int]:
    """PostgreSQL backends serving one side (its pool), for their CPU time."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = $1",
            application_name,
        )
    finally:
        await conn.close()
    return [r["pid"] for r in rows]


def processes_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue  # a pooled connection was recycled; its time is lost (never gained)
        total += times.user + times.system
    return total


# --- load ----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float = 0.0  # server process CPU per request
    db_cpu_us: float = 0.0  # its PostgreSQL backends' CPU per request
    client_cpu_us: float = 0.0  # this client's CPU per request (near a full core: it limits)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


async def load(
    port: int,
    request: bytes,
    seconds: float,
    check: bytes,
    server: Server | None = None,
    db: list[int] = (),  # type: ignore[assignment]
) -> LoadResult:
    """``CONCURRENCY`` keep-alive connections sending ``request`` back to back for ``seconds``;
    every answer must be a 200 of ``check``'s length."""
    conns = [await Connection.open(port) for _ in range(CONCURRENCY)]
    cpu0 = server.cpu() if server else 0.0
    db0 = processes_cpu(list(db))
    me = psutil.Process()
    client0 = sum(me.cpu_times()[:2])
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(conn: Connection) -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            status, body = await conn.roundtrip(request)
            latencies.append(time.perf_counter() - t)
            if status != 200 or len(body) != len(check):
                raise RuntimeError(f"unexpected answer {status}: {body[:200]!r}")

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - started
    for conn in conns:
        await conn.close()
    cpu = (server.cpu() - cpu0) if server else 0.0
    db_cpu = processes_cpu(list(db)) - db0
    client = sum(me.cpu_times()[:2]) - client0
    q = statistics.quantiles(latencies, n=100)
    n = len(latencies)
    return LoadResult(
        n, elapsed, q[49] * 1000, q[98] * 1000, cpu / n * 1e6, db_cpu / n * 1e6, client / n * 1e6
    )
