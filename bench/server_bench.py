"""Server benchmark: the whole HTTP stack, one uvicorn worker (uvloop, httptools) on loopback.

Two questions, each answered against a baseline measured in the same run:

1. **Read throughput.** ``threads.list`` and ``items.list`` (20 rows, JWT auth, request
   parsing, ownership checks, PostgreSQL) against a bare FastAPI endpoint in the same process
   that returns stored bytes of the same JSON size. Requests per second and p99 latency at a
   fixed concurrency, from a small raw HTTP/1.1 keep-alive client (so the client is not the
   bottleneck). Target: ratio >= 0.5.
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
from tests.pgharness import PgServer, describe, migrate, postgres_server

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SECRET = "server-benchmark-secret-" + "x" * 40
USER = "bench"

CONCURRENCY = 16
LOAD_SECONDS = 3.0
WARMUP_SECONDS = 1.0
THROUGHPUT_ROUNDS = 3
PAGE = 20

SHORT, LONG = 200, 2000
STREAMS = {SHORT: 20, LONG: 5}
CPU_ROUNDS = 7

TARGET_THROUGHPUT_RATIO = 0.5
TARGET_DELTA_RATIO = 1.10


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


@contextmanager
def server_process(name: str, url: str, store: str, log: Path, cpu: int | None) -> Iterator[Server]:
    port = _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JWT_", "OPENAI_", "MCP_", "PRODUCTION", "CORS_", "AGENT_"))
    }
    env |= {
        "DATABASE_URL": url,
        "JWT_SECRET": SECRET,
        "BENCH_STORE": store,
        "THREAD_TITLES": "first_message",
        "LOG_LEVEL": "INFO",
        # More pooled connections than concurrent requests: with the default 10 + 5 overflow,
        # 16 concurrent requests make SQLAlchemy open and close overflow connections all the
        # time (a new PostgreSQL backend each), which would measure connection churn.
        "DB_POOL_SIZE": str(CONCURRENCY + 4),
        "DB_MAX_OVERFLOW": "0",
        "DATA_DIR": str(RESULTS_DIR / ".data"),
        # The per-user limiter still runs on every request (its cost is measured) but never
        # refuses: one user sends everything here.
        "RATE_LIMIT_PER_MINUTE": os.environ.get("BENCH_RATE_LIMIT_PER_MINUTE", "100000000"),
        "MAX_STREAMS_PER_USER": "0",
    }
    cmd = [
        sys.executable, "-m", "uvicorn", "bench.server_app:create_bench_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            cmd, cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=log_file, preexec_fn=_pin(cpu)
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{name} server did not start; see {log}") from None
                    time.sleep(0.05)
            yield Server(name, port, process, psutil.Process(process.pid))
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def backend_pids(dsn: str) -> list[int]:
    """PostgreSQL backends serving the app (its pool), for their CPU time."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'chatkit-pg'"
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


# --- part 1: throughput against a bare endpoint --------------------------------------------


@dataclass
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float = 0.0  # server process CPU per request
    db_cpu_us: float = 0.0  # its PostgreSQL backends' CPU per request

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
    conns = [await Connection.open(port) for _ in range(CONCURRENCY)]
    cpu0 = server.cpu() if server else 0.0
    db0 = processes_cpu(list(db))
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
    q = statistics.quantiles(latencies, n=100)
    n = len(latencies)
    return LoadResult(n, elapsed, q[49] * 1000, q[98] * 1000, cpu / n * 1e6, db_cpu / n * 1e6)


async def seed(port: int, token: str) -> tuple[str, str]:
    """20 threads for the user; one of them with 20 items. Returns (a thread id, the big one)."""
    conn = await Connection.open(port)
    thread_ids = []
    for n in range(PAGE):
        status, body = await conn.roundtrip(
            chatkit("threads.create", {"input": user_input(f"deltas:5 thread {n}")}, token)
        )
        assert status == 200, body[:300]
        first = json.loads(body.split(b"\n\n")[0][len(b"data: ") :])
        thread_ids.append(first["thread"]["id"])
    big = thread_ids[-1]
    for n in range(PAGE // 2 - 1):
        params = {"thread_id": big, "input": user_input(f"deltas:5 message {n}")}
        status, _ = await conn.roundtrip(chatkit("threads.add_user_message", params, token))
        assert status == 200
    await conn.close()
    return thread_ids[0], big


async def throughput(server: Server, token: str, dsn: str) -> dict[str, Any]:
    _, big = await seed(server.port, token)
    requests = {
        "threads.list": chatkit("threads.list", {"limit": PAGE}, token),
        "items.list": chatkit("items.list", {"thread_id": big, "limit": PAGE}, token),
    }
    out: dict[str, Any] = {}
    for op, request in requests.items():
        conn = await Connection.open(server.port)  # uvicorn closes idle keep-alives after 5 s
        status, real = await conn.roundtrip(request)
        assert status == 200
        page = json.loads(real)
        assert len(page["data"]) == PAGE, page
        name = op.replace(".", "_")
        status, _ = await conn.roundtrip(http_request("PUT", f"/bench/bare/{name}", real))
        assert status == 204
        await conn.close()
        body = request.split(b"\r\n\r\n", 1)[1]  # the same request body, to a bare route
        bare = http_request("POST", f"/bench/bare/{name}", body, token)
        sides = {"chatkit": request, "bare": bare}
        runs: dict[str, list[LoadResult]] = {"chatkit": [], "bare": []}
        for req in sides.values():
            await load(server.port, req, WARMUP_SECONDS, real)
        for r in range(THROUGHPUT_ROUNDS):
            order = ["chatkit", "bare"] if r % 2 == 0 else ["bare", "chatkit"]
            for side in order:
                db = await backend_pids(dsn)
                result = await load(server.port, sides[side], LOAD_SECONDS, real, server, db)
                runs[side].append(result)
        summary = {
            side: {
                "rps_median": round(statistics.median(x.rps for x in rs), 1),
                "p50_ms_median": round(statistics.median(x.p50_ms for x in rs), 2),
                "p99_ms_median": round(statistics.median(x.p99_ms for x in rs), 2),
                "server_cpu_us_per_request_median": round(
                    statistics.median(x.server_cpu_us for x in rs), 1
                ),
                "db_cpu_us_per_request_median": round(
                    statistics.median(x.db_cpu_us for x in rs), 1
                ),
                "runs_rps": [round(x.rps, 1) for x in rs],
                "runs_p99_ms": [round(x.p99_ms, 2) for x in rs],
            }
            for side, rs in runs.items()
        }
        summary["body_bytes"] = len(real)
        summary["ratio_rps_paired_median"] = round(
            statistics.median(
                c.rps / b.rps for c, b in zip(runs["chatkit"], runs["bare"], strict=True)
            ),
            3,
        )
        summary["ratio_rps"] = round(
            summary["chatkit"]["rps_median"] / summary["bare"]["rps_median"], 3
        )
        summary["ratio_server_cpu_per_request"] = round(
            summary["bare"]["server_cpu_us_per_request_median"]
            / summary["chatkit"]["server_cpu_us_per_request_median"],
            3,
        )
        summary["ratio_p99"] = round(
            summary["chatkit"]["p99_ms_median"] / summary["bare"]["p99_ms_median"], 3
        )
        out[op] = summary
    return out


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


def _token() -> str:
    now = int(time.time())
    return jwt.encode({"sub": USER, "iat": now, "exp": now + 24 * 3600}, SECRET, algorithm="HS256")


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
    token = _token()
    started = time.perf_counter()
    with (
        server_process(
            "postgres", url, "postgres", RESULTS_DIR / "server-postgres.log", server_cpu
        ) as pg_server,
        server_process(
            "memory", url, "memory", RESULTS_DIR / "server-memory.log", server_cpu
        ) as mem_server,
    ):
        reads = await throughput(pg_server, token, PgServer.dsn(url))
        t_reads = time.perf_counter() - started
        deltas = await delta_cost(
            {"postgres": pg_server, "memory": mem_server}, token, PgServer.dsn(url)
        )
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
            "db_pool_size": CONCURRENCY + 4,
            "concurrency": CONCURRENCY,
            "load_seconds": LOAD_SECONDS,
            "throughput_rounds": THROUGHPUT_ROUNDS,
            "page_rows": PAGE,
            "deltas": [SHORT, LONG],
            "streams_per_batch": {str(k): v for k, v in STREAMS.items()},
            "cpu_rounds": CPU_ROUNDS,
            "phase_s": {
                "throughput": round(t_reads, 1),
                "deltas": round(time.perf_counter() - started - t_reads, 1),
            },
        },
        "throughput": reads,
        "delta_cpu": deltas,
        "targets": {
            "throughput_ratio_min": TARGET_THROUGHPUT_RATIO,
            "postgres_over_memory_per_delta_max": TARGET_DELTA_RATIO,
        },
        "verdict": {
            "threads.list": reads["threads.list"]["ratio_rps"] >= TARGET_THROUGHPUT_RATIO,
            "items.list": reads["items.list"]["ratio_rps"] >= TARGET_THROUGHPUT_RATIO,
            "per_delta": deltas["ratio_slope"] <= TARGET_DELTA_RATIO,
        },
    }


def _report(res: dict[str, Any]) -> None:
    print("\nserver benchmark (one uvicorn worker on loopback; medians over rounds)")
    print(f"  PostgreSQL: {res['meta']['postgres']['kind']}; concurrency {CONCURRENCY}")
    for op, r in res["throughput"].items():
        c, b = r["chatkit"], r["bare"]
        print(
            f"  {op:13} {c['rps_median']:8.0f} req/s p99 {c['p99_ms_median']:6.2f} ms | bare FastAPI "
            f"({r['body_bytes']} B) {b['rps_median']:8.0f} req/s p99 {b['p99_ms_median']:6.2f} ms | "
            f"ratio {r['ratio_rps']:.2f}, paired {r['ratio_rps_paired_median']:.2f} "
            f"(target >= {TARGET_THROUGHPUT_RATIO})"
        )
        print(
            f"  {'':13} server CPU per request {c['server_cpu_us_per_request_median']:.0f} us "
            f"(+{c['db_cpu_us_per_request_median']:.0f} us in PostgreSQL) vs bare "
            f"{b['server_cpu_us_per_request_median']:.0f} us: ratio "
            f"{r['ratio_server_cpu_per_request']:.2f}"
        )
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
    """Fresh migrated database, two server processes, the two measurements; prints and saves."""
    started = time.perf_counter()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with postgres_server() as server:
        url = asyncio.run(server.create_database("ckpg_server_bench"))
        try:
            migrate(url)
            res = asyncio.run(_bench(url, server))
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
