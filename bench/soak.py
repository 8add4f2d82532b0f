"""``make soak``: hundreds of concurrent ChatKit streams through one uvicorn worker, checked
event by event. A load run, not a timed test.

    python -m bench.soak [--streams 500] [--seconds 60] [--deltas 60] [--interval-ms 250]
                         [--modes plain,resumable | --resumable]

One uvicorn worker (uvloop, httptools) serves ``bench.soak_app``: the real app with a scripted
model streaming numbered deltas (``<tag>:tok-0001 ``, ``<tag>:tok-0002 ``, ... every
``interval_ms``), a 10 ms event-loop lag probe and a stats route. This process is the client:
``--streams`` workers, one user each, each keeping one stream open at a time on a keep-alive
HTTP/1.1 connection (raw asyncio sockets) and opening the next as soon as one ends, so about
``--streams`` streams are always open: workers start over ``--ramp`` seconds, run for
``--seconds``, then finish the stream they are in (no stream is cut). A worker creates a thread
and adds ``--followups`` more messages to it before starting a new one.

Modes (``--modes``, default both, one after the other in the same run, each on a fresh server
process and database): *plain* streams as every client does, *resumable* sends
``X-Chatkit-Resumable: true`` (docs/runs.md), so every reply runs detached and is logged in
PostgreSQL; its streams are checked for the ``X-Chatkit-Run`` header and an ``id:
<run_id>:<seq>`` on every event, ``seq`` from 1 without gaps. ``--resumable`` runs that mode
alone. The comparison (integrity, first-event latency, pool and connection figures, CPU per
delta) is printed and written under ``"comparison"``.

Every stream is checked: HTTP 200, the ChatKit events in the expected order, every delta of the
reply exactly once, in order and carrying the stream's own tag (lost / duplicated /
out-of-order / foreign deltas are counted), and the final ``thread.item.done`` text equal to the
deltas joined. Afterwards PostgreSQL is checked: each completed reply stored exactly once, with
the full text, and no other rows.

Measured: streams and events checked, errors by kind, first-event latency (request written →
first complete SSE event), the gaps between deltas, the server's event-loop lag (in the server),
the server's RSS idle and with all streams open (→ memory per open stream), database
connections (``pg_stat_activity`` by state, and the pool's checked-out count and peak). The
client's own loop lag is reported too: if it is high, the latencies are partly the client's.
The environment asks for RATE_LIMIT_PER_MINUTE=0 and MAX_STREAMS_PER_USER=0 (0 = off).

Exit status 1 when integrity fails (an event lost, duplicated, out of order or from another
stream, a malformed stream, a reply stored wrongly); failures the server reports (503, an
``error`` event: overload) are counted and printed, not asserted: this is a load run.

Database: ``TEST_DATABASE_URL``, else ``DATABASE_URL`` (a server to create a fresh database
on), else what ``tests.harness.pg`` picks (a container, or the embedded PostgreSQL). Results:
``bench/results/soak.json`` (one report per mode), the server's log in
``bench/results/soak-server-<mode>.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import psutil
from prometheus_client.parser import text_string_to_metric_families

from app.settings import PROJECT_ROOT, normalise_database_url
from bench import RESULTS_DIR
from bench.httpload import Connection, chatkit, http_request, user_input, wait_listening
from bench.soak_app import delta_text
from bench.soak_modes import MODES, compare, print_comparison
from tests.harness.pg import PgServer, describe, migrate, postgres_server

SECRET = "soak-secret-" + "s" * 40
SAMPLE_SECONDS = 0.5
LAG_INTERVAL = 0.010
DELTA = re.compile(r"(\S+):tok-(\d{4,}) ")
RESUMABLE = b"X-Chatkit-Resumable: true"
TITLE_NOT_SENT = "reply_stands_title_not_sent"


# --- small helpers --------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def dist(values: list[float], scale: float = 1.0, digits: int = 2) -> dict[str, Any]:
    """p50/p90/p99/p99.9/max of ``values`` (times ``scale``)."""
    if not values:
        return {"n": 0}
    v = sorted(x * scale for x in values)
    return {
        "n": len(v),
        "p50": round(percentile(v, 50), digits),
        "p90": round(percentile(v, 90), digits),
        "p99": round(percentile(v, 99), digits),
        "p99_9": round(percentile(v, 99.9), digits),
        "max": round(v[-1], digits),
        "mean": round(statistics.fmean(v), digits),
    }


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 6 * 3600}, SECRET, algorithm="HS256")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LagProbe:
    """The client's own event-loop lag (same probe as the server's)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(LAG_INTERVAL)
            self.samples.append((started, time.monotonic() - started - LAG_INTERVAL))

    def window(self, since: float, until: float) -> list[float]:
        return [lag * 1000 for t, lag in self.samples if since <= t < until]


# --- one stream, checked event by event -----------------------------------------------------


@dataclass
class StreamCheck:
    """The events of one reply as they arrive, against what the scripted model sends."""

    op: str
    tag: str
    deltas: int
    kinds: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    thread_id: str | None = None
    user_item_id: str | None = None
    assistant_id: str | None = None
    final_text: str | None = None
    part_done_text: str | None = None
    server_error: str | None = None  # code: message of an in-band ``error`` event
    received: list[str] = field(default_factory=list)  # delta texts in arrival order
    seen: set[int] = field(default_factory=set)
    max_seen: int = 0
    lost = duplicated = out_of_order = foreign = not_sent = 0
    events = 0
    heartbeats = 0
    delta_times: list[float] = field(default_factory=list)
    run_id: str | None = None  # resumable mode: every event must carry ``id: <run_id>:<seq>``
    last_seq = 0

    def event_id(self, value: bytes | None) -> None:
        """Resumable mode: the event's ``id:`` is this run's and the next ``seq``."""
        if self.run_id is None:
            return
        run, _, seq = (value or b"").decode(errors="replace").rpartition(":")
        if value is None:
            self.errors["event_without_id"] += 1
        elif run != self.run_id or not seq.isdigit():
            self.errors["event_id_of_another_run"] += 1
        elif int(seq) != self.last_seq + 1:
            self.errors["event_id_not_next_seq"] += 1
        else:
            self.last_seq = int(seq)

    def event(self, ev: dict[str, Any], now: float) -> None:
        self.events += 1
        kind = ev.get("type", "?")
        if kind == "thread.item.updated":
            update = ev.get("update") or {}
            sub = update.get("type", "?")
            if ev.get("item_id") != self.assistant_id:
                self.errors["update_for_unknown_item"] += 1
            if sub == "assistant_message.content_part.text_delta":
                self.delta(str(update.get("delta", "")), now)
                kind = "delta"
            elif sub == "assistant_message.content_part.added":
                kind = "part.added"
            elif sub == "assistant_message.content_part.done":
                kind = "part.done"
                self.part_done_text = (update.get("content") or {}).get("text")
            else:
                kind = sub
        elif kind in ("thread.item.added", "thread.item.done"):
            item = ev.get("item") or {}
            item_type = item.get("type", "?")
            if self.thread_id is not None and item.get("thread_id") != self.thread_id:
                self.errors["item_of_another_thread"] += 1
            if item_type == "assistant_message":
                if kind == "thread.item.added":
                    self.assistant_id = item.get("id")
                else:
                    if item.get("id") != self.assistant_id:
                        self.errors["done_id_differs_from_added"] += 1
                    self.final_text = "".join(p.get("text", "") for p in item.get("content", []))
            elif item_type == "user_message" and kind == "thread.item.done":
                self.user_item_id = item.get("id")
                if self.thread_id is None:
                    self.thread_id = item.get("thread_id")
            kind = f"{item_type}.{kind.rsplit('.', 1)[1]}"
        elif kind == "thread.created":
            self.thread_id = (ev.get("thread") or {}).get("id")
        elif kind == "error":
            code = ev.get("code", "?")
            message = ev.get("message") or ""
            self.server_error = f"{code}: {message}" if message else code
            self.errors[f"error_event({self.server_error})"] += 1
        self.kinds.append(kind)

    def delta(self, text: str, now: float) -> None:
        self.received.append(text)
        self.delta_times.append(now)
        match = DELTA.fullmatch(text)
        if match is None or match[1] != self.tag:
            self.foreign += 1
            return
        n = int(match[2])
        if n in self.seen:
            self.duplicated += 1
            return
        if n < 1 or n > self.deltas:
            self.foreign += 1
            return
        if n < self.max_seen:
            self.out_of_order += 1
        self.seen.add(n)
        self.max_seen = max(self.max_seen, n)

    def expected_kinds(self) -> list[str]:
        head = ["thread.created"] if self.op == "threads.create" else []
        tail = ["thread.updated"] if self.op == "threads.create" else []
        return [
            *head,
            "user_message.done",
            "stream_options",
            "assistant_message.added",
            "part.added",
            "delta*",
            "part.done",
            "assistant_message.done",
            *tail,
        ]

    def collapsed(self) -> list[str]:
        return [
            k for k, _ in itertools.groupby("delta*" if k == "delta" else k for k in self.kinds)
        ]

    def finish(self) -> None:
        """Called once the stream has ended cleanly: the whole-stream checks.

        A stream the server ended with an ``error`` event (a failure it reported in-band) is
        checked as far as it went: what it sent must be a prefix of the expected events, in
        order, and its missing deltas count as not sent, not as lost."""
        expected_kinds = self.expected_kinds()
        kinds = self.collapsed()
        if self.server_error is not None:
            self.not_sent = self.deltas - len(self.seen)
            before = kinds[: kinds.index("error")]
            if kinds[-1] != "error" or kinds.count("error") != 1:
                self.errors["events_after_error_event"] += 1
            elif before != expected_kinds[: len(before)] and not (
                before
                and before[-1] == "delta*"
                and before[:-1] == expected_kinds[: len(before) - 1]
            ):
                self.errors["event_sequence"] += 1
        else:
            self.lost = self.deltas - len(self.seen)
            # A thread whose first reply failed has no title yet: the next reply sets it.
            untitled = self.op != "threads.create" and kinds == [*expected_kinds, "thread.updated"]
            if self.op == "threads.create" and kinds == expected_kinds[:-1]:
                # The reply complete, the title step after it failed (the server logs "a step
                # after the complete reply failed; the reply stands"): a failure it reports.
                self.errors[TITLE_NOT_SENT] += 1
            elif kinds != expected_kinds and not untitled:
                self.errors["event_sequence"] += 1
        for name in ("lost", "duplicated", "out_of_order", "foreign"):
            if getattr(self, name):
                self.errors[f"{name}_deltas"] += 1
        if self.server_error is not None:
            return
        expected = "".join(delta_text(self.tag, n) for n in range(1, self.deltas + 1))
        if self.final_text is None:
            self.errors["no_final_item"] += 1
        elif self.final_text != expected or self.final_text != "".join(self.received):
            self.errors["final_text_mismatch"] += 1
        if self.part_done_text is not None and self.part_done_text != expected:
            self.errors["part_done_text_mismatch"] += 1

    @property
    def complete(self) -> bool:
        return self.final_text is not None and self.assistant_id is not None


class StreamBroken(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


async def read_head(conn: Connection) -> tuple[int, dict[bytes, bytes]]:
    line = await conn.reader.readline()
    if not line:
        raise StreamBroken("eof_before_response")
    status = int(line.split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    while (line := await conn.reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if not line:
        raise StreamBroken("eof_in_headers")
    return status, headers


def sse_events(buffer: bytearray, check: StreamCheck, first: list[float], now: float) -> None:
    """Hand every complete event in ``buffer`` to ``check`` (and drop it from the buffer)."""
    while (end := buffer.find(b"\n\n")) >= 0:
        block = bytes(buffer[:end])
        del buffer[: end + 2]
        if block.startswith(b":"):
            check.heartbeats += 1
            continue
        lines = block.split(b"\n")
        data = [ln[6:] for ln in lines if ln.startswith(b"data: ")]
        if not data:
            check.errors["event_without_data"] += 1
            continue
        try:
            event = json.loads(b"\n".join(data))
        except ValueError:
            check.errors["bad_event_json"] += 1
            continue
        if not first:
            first.append(now)
        check.event_id(next((ln[4:] for ln in lines if ln.startswith(b"id: ")), None))
        check.event(event, now)


async def read_sse(
    conn: Connection, headers: dict[bytes, bytes], check: StreamCheck, first: list[float]
) -> None:
    """The body of an SSE response, event by event, into ``check``: chunked (a stream) or
    with a Content-Length (an answer the endpoint made before any stream started)."""
    reader = conn.reader
    buffer = bytearray()
    if b"content-length" in headers:
        try:
            buffer += await reader.readexactly(int(headers[b"content-length"]))
        except asyncio.IncompleteReadError:
            raise StreamBroken("connection_closed_mid_stream") from None
        sse_events(buffer, check, first, time.monotonic())
        if buffer.strip():
            check.errors["unterminated_event"] += 1
        return
    while True:
        line = await reader.readline()
        if not line:
            raise StreamBroken("connection_closed_mid_stream")
        try:
            size = int(line.split(b";", 1)[0], 16)
        except ValueError:
            raise StreamBroken("bad_chunk") from None
        if size == 0:
            while (line := await reader.readline()) not in (b"\r\n", b""):
                pass  # trailers
            if buffer.strip():
                check.errors["unterminated_event"] += 1
            return
        try:
            buffer += await reader.readexactly(size)
            await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            raise StreamBroken("connection_closed_mid_stream") from None
        sse_events(buffer, check, first, time.monotonic())


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Stream:
    """What one stream left behind, for the report and the database check."""

    worker: int
    user: str
    op: str
    started: float
    ended: float
    first_event: float | None
    first_delta: float | None
    check: StreamCheck
    kind: str | None = None  # how it broke, if it did


@dataclass
class Load:
    args: argparse.Namespace
    port: int
    open_streams: int = 0
    streams: list[Stream] = field(default_factory=list)
    reconnects: int = 0
    connects: int = 0
    gaps: list[float] = field(default_factory=list)

    async def stream(
        self,
        conn: Connection | None,
        worker: int,
        user: str,
        tok: str,
        op: str,
        thread: str | None,
        tag: str,
    ) -> tuple[Connection | None, Stream]:
        args = self.args
        text = f"soak deltas={args.deltas} interval_ms={args.interval_ms:g} tag={tag}"
        params: dict[str, Any] = {"input": user_input(text)}
        if thread is not None:
            params["thread_id"] = thread
        request = chatkit(op, params, tok)
        resumable = getattr(args, "mode", "plain") == "resumable"
        if resumable:
            request = request.replace(b"\r\n\r\n", b"\r\n" + RESUMABLE + b"\r\n\r\n", 1)
        check = StreamCheck(op, tag, args.deltas)
        first: list[float] = []
        kind: str | None = None
        started = time.monotonic()
        self.open_streams += 1
        try:
            async with asyncio.timeout(args.stream_timeout):
                for attempt in (0, 1):
                    reused = conn is not None
                    if conn is None:
                        conn = await Connection.open(self.port)
                        self.connects += 1
                    started = time.monotonic()
                    conn.writer.write(request)
                    try:
                        status, headers = await read_head(conn)
                        break
                    except (StreamBroken, ConnectionError) as exc:
                        # The server may close an idle keep-alive connection as we reuse it.
                        await close(conn)
                        conn = None
                        if not reused or attempt:
                            raise StreamBroken("no_response") from exc
                        self.reconnects += 1
                if status != 200:
                    raise StreamBroken(f"http_{status}")
                if not headers.get(b"content-type", b"").startswith(b"text/event-stream"):
                    raise StreamBroken("not_event_stream")
                if resumable:
                    run_id = headers.get(b"x-chatkit-run")
                    if not run_id:
                        raise StreamBroken("resumable_stream_without_run_header")
                    check.run_id = run_id.decode()
                if b"chunked" not in headers.get(b"transfer-encoding", b"") and (
                    b"content-length" not in headers
                ):
                    raise StreamBroken("neither_chunked_nor_sized")
                await read_sse(conn, headers, check, first)
                check.finish()
                if headers.get(b"connection", b"").lower() == b"close":
                    await close(conn)
                    conn = None
        except StreamBroken as exc:
            kind = exc.kind
        except TimeoutError:
            kind = "timeout"
        except (ConnectionError, OSError) as exc:
            kind = f"socket_{type(exc).__name__}"
        finally:
            self.open_streams -= 1
        if kind is not None and conn is not None:
            await close(conn)
            conn = None
        first_delta = check.delta_times[0] if check.delta_times else None
        self.gaps += [b - a for a, b in itertools.pairwise(check.delta_times)]
        check.delta_times = []
        record = Stream(
            worker, user, op, started, time.monotonic(), first[0] if first else None, first_delta,
            check, kind,
        )  # fmt: skip
        self.streams.append(record)
        return conn, record

    async def worker(self, i: int, start_at: float, stop_at: float) -> None:
        args = self.args
        user = f"soak-{i:04d}"
        tok = token(user)
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        conn: Connection | None = None
        thread: str | None = None
        in_thread = 0
        for k in itertools.count(1):
            if time.monotonic() >= stop_at:
                break
            op = (
                "threads.create"
                if thread is None or in_thread > args.followups
                else "threads.add_user_message"
            )
            if op == "threads.create":
                thread = None
            conn, record = await self.stream(conn, i, user, tok, op, thread, f"u{i:04d}s{k:04d}")
            if record.kind is None and not record.check.errors and record.check.thread_id:
                thread = record.check.thread_id
                in_thread = 1 if op == "threads.create" else in_thread + 1
            else:
                thread = None  # start afresh after a failure
        if conn is not None:
            await close(conn)


async def close(conn: Connection) -> None:
    conn.writer.close()
    with contextlib.suppress(Exception):
        await conn.writer.wait_closed()


# --- the server process -----------------------------------------------------------------------


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    ps: psutil.Process
    log: Path


def _preexec(cpu: int | None) -> Callable[[], None]:
    def setup() -> None:
        raise_fd_limit()
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return setup


@contextlib.contextmanager
def server_process(
    url: str,
    args: argparse.Namespace,
    cpu: int | None,
    *,
    extra_env: dict[str, str] | None = None,
    log_name: str = "soak-server.log",
) -> Iterator[Server]:
    """The soak app in a uvicorn process of its own; ``extra_env`` adds settings (other
    benchmarks reuse it: bench/stall_bench.py)."""
    port = free_port()
    log = RESULTS_DIR / log_name
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JWT_", "OPENAI_", "MCP_", "PRODUCTION", "CORS_", "AGENT_"))
    }
    env |= {
        "DATABASE_URL": url,
        "JWT_SECRET": SECRET,
        "THREAD_TITLES": "first_message",
        "LOG_LEVEL": "INFO",
        "DATA_DIR": str(RESULTS_DIR / ".data"),
        # Being added to the app: 0 turns each limit off (unknown settings are ignored).
        "RATE_LIMIT_PER_MINUTE": "0",
        "MAX_STREAMS_PER_USER": "0",
    }
    if args.pool_size:
        env["DB_POOL_SIZE"] = str(args.pool_size)
    if args.max_overflow is not None:
        env["DB_MAX_OVERFLOW"] = str(args.max_overflow)
    if args.without_limits:
        env["SOAK_WITHOUT_LIMITS"] = "1"
    env |= extra_env or {}
    cmd = [
        sys.executable, "-m", "uvicorn", "bench.soak_app:create_soak_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning", "--backlog", "4096",
        "--timeout-keep-alive", "30", "--timeout-graceful-shutdown", "20",
    ]  # fmt: skip
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            cmd, cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=log_file,
            preexec_fn=_preexec(cpu),
        )  # fmt: skip
        try:
            wait_listening(process, port, "the soak server", log)
            yield Server(port, process, psutil.Process(process.pid), log)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def get_json(port: int, path: str) -> Any:
    conn = await Connection.open(port)
    try:
        status, body = await conn.roundtrip(http_request("GET", path, b""))
    finally:
        await close(conn)
    if status != 200:
        raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
    return json.loads(body)


async def get_text(port: int, path: str) -> str:
    conn = await Connection.open(port)
    try:
        _, body = await conn.roundtrip(http_request("GET", path, b""))
    finally:
        await close(conn)
    return body.decode()


# --- sampling while the load runs -------------------------------------------------------------

PG_STATES = (
    "SELECT coalesce(state, 'unknown') AS state, count(*) AS n FROM pg_stat_activity "
    "WHERE application_name = 'chatkit-pg' AND datname = current_database() GROUP BY 1"
)
# What the connections that are not idle are doing (for 'idle in transaction': what they did
# last), and for how long the oldest has been in that state.
PG_BUSY = (
    "SELECT state || ': ' || left(regexp_replace(query, '\\s+', ' ', 'g'), 70) AS what, "
    "count(*) AS n, max(extract(epoch FROM clock_timestamp() - state_change))::float8 * 1000 AS age_ms "
    "FROM pg_stat_activity WHERE application_name = 'chatkit-pg' "
    "AND datname = current_database() AND state <> 'idle' GROUP BY 1"
)


async def sample(
    server: Server, load: Load | None, db: asyncpg.Connection, t0: float
) -> dict[str, Any]:
    t = time.monotonic()
    stats = await get_json(server.port, "/soak/stats?reset_peak=true")
    probe_ms = (time.monotonic() - t) * 1000
    rows = await db.fetch(PG_STATES)
    states = {r["state"]: r["n"] for r in rows}
    busy = await db.fetch(PG_BUSY)
    try:
        cpu = server.ps.cpu_times()
        server_cpu = cpu.user + cpu.system
    except psutil.Error:
        server_cpu = float("nan")
    return {
        "t": round(t - t0, 2),
        "client_open": load.open_streams if load else 0,
        "client_streams_done": len(load.streams) if load else 0,
        "client_streams_failed": sum(1 for x in load.streams if x.kind or x.check.errors)
        if load
        else 0,
        "server_active_streams": int(stats["active_streams"]),
        "rss_mb": round(stats["rss"] / 2**20, 1),
        "fds": stats["fds"],
        "asyncio_tasks": stats["asyncio_tasks"],
        "pool_checked_out": stats["pool"]["checked_out"],
        "pool_peak_checked_out": stats["pool"]["peak_checked_out"],
        "pool_connects": stats["pool"]["connects"],
        "pg_total": sum(states.values()),
        "pg_states": states,
        "pg_busy": {r["what"]: r["n"] for r in busy},
        "pg_busy_oldest_ms": round(max((r["age_ms"] for r in busy), default=0.0), 1),
        "stats_probe_ms": round(probe_ms, 1),
        "server_cpu_s": round(server_cpu, 2),
        "machine_cpu_pct": psutil.cpu_percent(percpu=True),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


async def sampler(
    server: Server,
    load: Load,
    db: asyncpg.Connection,
    t0: float,
    out: list[dict[str, Any]],
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        try:
            out.append(await sample(server, load, db, t0))
        except Exception as exc:  # a missed sample is reported, never fatal
            out.append(
                {"t": round(time.monotonic() - t0, 2), "error": f"{type(exc).__name__}: {exc}"}
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)


# --- after the load: PostgreSQL holds each reply exactly once ---------------------------------

ITEMS_SQL = """
SELECT user_id, thread_id, id, type,
       (SELECT string_agg(c->>'text', '' ORDER BY n)
          FROM jsonb_array_elements(CASE WHEN jsonb_typeof(data->'content') = 'array'
                                         THEN data->'content' ELSE '[]'::jsonb END)
               WITH ORDINALITY AS x(c, n)) AS text
FROM chatkit_items
"""


async def verify_database(dsn: str, streams: list[Stream]) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(ITEMS_SQL)
        threads = await conn.fetch("SELECT user_id, id, title FROM chatkit_threads")
    finally:
        await conn.close()
    by_key = {(r["user_id"], r["thread_id"], r["id"]): r for r in rows}
    types = Counter(r["type"] for r in rows)
    db_per_thread: Counter[tuple[str, str, str]] = Counter(
        (r["user_id"], r["thread_id"], r["type"]) for r in rows
    )
    seen_per_thread: Counter[tuple[str, str, str]] = Counter()
    missing = text_mismatch = user_missing = 0
    checked = 0
    for s in streams:
        c = s.check
        if c.thread_id is None:
            continue
        if c.user_item_id is not None:
            seen_per_thread[(s.user, c.thread_id, "user_message")] += 1
            if (s.user, c.thread_id, c.user_item_id) not in by_key:
                user_missing += 1
        if not c.complete:
            continue
        checked += 1
        seen_per_thread[(s.user, c.thread_id, "assistant_message")] += 1
        row = by_key.get((s.user, c.thread_id, c.assistant_id))
        if row is None:
            missing += 1
        elif row["text"] != c.final_text:
            text_mismatch += 1
    extra = {
        kind: sum(
            max(0, n - seen_per_thread[key]) for key, n in db_per_thread.items() if key[2] == kind
        )
        for kind in ("assistant_message", "user_message")
    }
    created = {
        (s.user, s.check.thread_id)
        for s in streams
        if s.op == "threads.create" and s.check.thread_id
    }
    stored_threads = {(r["user_id"], r["id"]) for r in threads}
    result = {
        "replies_checked": checked,
        "replies_missing": missing,
        "replies_text_mismatch": text_mismatch,
        "extra_assistant_rows": extra["assistant_message"],
        "user_messages_missing": user_missing,
        "extra_user_rows": extra["user_message"],
        "item_rows_by_type": dict(types),
        "threads_created_by_client": len(created),
        "threads_stored": len(stored_threads),
        "threads_missing": len(created - stored_threads),
        "threads_without_title": sum(1 for r in threads if not r["title"]),
    }
    other = sum(n for t, n in types.items() if t not in ("assistant_message", "user_message"))
    result["ok"] = not (
        missing or text_mismatch or user_missing or other or any(extra.values())
        or result["threads_missing"]
    )  # fmt: skip
    return result


# --- the run ----------------------------------------------------------------------------------


PLAIN_LOG = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ - (\S+) - (\w+) - (.*)$")


def scan_log(path: Path) -> dict[str, Any]:
    """The server's log by level, its stream outcomes, and its warnings and errors grouped
    by message. Lines that are not JSON are counted too (tracebacks a library printed)."""
    levels: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    other = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            other += 1
            if match := PLAIN_LOG.match(line):
                problems[f"(plain text) {match[2]} {match[1]}: {match[3]}"[:160]] += 1
            continue
        level = entry.get("level", "?")
        levels[level] += 1
        if entry.get("msg") == "stream closed":
            outcomes[entry.get("outcome", "?")] += 1
        if level in ("WARNING", "ERROR", "CRITICAL"):
            msg = re.sub(r"Task-\d+", "Task-N", str(entry.get("msg")).split("\n")[0])
            if entry.get("reason"):
                msg += f" ({entry['reason']})"
            problems[f"{level} {entry.get('logger')}: {msg}"[:160]] += 1
    return {
        "lines_by_level": dict(levels),
        "non_json_lines": other,
        "stream_outcomes": dict(outcomes),
        "problems": dict(problems.most_common(20)),
    }


def store_metrics(text: str) -> dict[str, Any]:
    """Mean store-call latency per method and stream outcomes, from /metrics."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    outcomes: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "chatkit_store_call_duration_seconds_sum":
                sums[s.labels["method"]] = s.value
            elif s.name == "chatkit_store_call_duration_seconds_count":
                counts[s.labels["method"]] = s.value
            elif s.name == "chatkit_stream_duration_seconds_count":
                key = f"{s.labels['op']}:{s.labels['outcome']}"
                outcomes[key] = outcomes.get(key, 0) + s.value
    return {
        "store_calls": {m: int(counts[m]) for m in sorted(counts)},
        "store_call_mean_ms": {
            m: round(sums[m] / counts[m] * 1000, 2) for m in sorted(counts) if counts[m]
        },
        "stream_outcomes": {k: int(v) for k, v in sorted(outcomes.items())},
    }


def placement(pin: bool) -> tuple[int | None, int | None]:
    if not pin:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process on the machine (to name the competition)."""
    out = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        info = proc.info
        times = info.get("cpu_times")
        if times is None:
            continue
        argv = list(info.get("cmdline") or [])
        if argv:
            argv[0] = Path(argv[0]).name
        cmd = " ".join(argv)[:100] or info.get("name") or "?"
        out[proc.pid] = (cmd, times.user + times.system)
    return out


def top_processes(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float
) -> list[dict[str, Any]]:
    rows = []
    for pid, (cmd, cpu) in after.items():
        used = cpu - before.get(pid, (cmd, 0.0))[1]
        if used > 0.02 * seconds:
            rows.append({"pid": pid, "cpu_pct": round(100 * used / seconds, 1), "cmd": cmd})
    return sorted(rows, key=lambda r: -r["cpu_pct"])[:10]


async def warm_up(port: int, args: argparse.Namespace) -> list[Stream]:
    """A few short streams load every code path and open pooled connections before "idle"."""
    warm = Load(argparse.Namespace(**{**vars(args), "deltas": 5, "interval_ms": 10}), port)
    await asyncio.gather(
        *(
            warm.stream(None, 9000 + i, f"warm-{i}", token(f"warm-{i}"), "threads.create", None, f"w{i}")
            for i in range(20)
        )
    )  # fmt: skip
    for s in warm.streams:
        if s.kind or s.check.errors:
            raise RuntimeError(f"warm-up stream failed: {s.kind} {dict(s.check.errors)}")
    return warm.streams


def cpu_seconds(times: Any) -> float:
    return float(times.user + times.system)


async def soak(url: str, pg: PgServer, args: argparse.Namespace) -> dict[str, Any]:
    server_cpu, client_cpu = placement(args.pin)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    dsn = PgServer.dsn(url)
    db = await asyncpg.connect(dsn, server_settings={"application_name": "chatkit-pg-soak"})
    probe = LagProbe()
    probe_task = asyncio.create_task(probe.run())
    try:
        log_name = f"soak-server-{getattr(args, 'mode', 'plain')}.log"
        with server_process(url, args, server_cpu, log_name=log_name) as server:
            t0 = time.monotonic()
            warm = await warm_up(server.port, args)
            await asyncio.sleep(2)
            idle_samples = []
            idle_from = time.monotonic()
            for _ in range(6):
                idle_samples.append(await sample(server, None, db, t0))
                await asyncio.sleep(SAMPLE_SECONDS)
            idle_until = time.monotonic()
            server_cpu0 = cpu_seconds(server.ps.cpu_times())
            client_cpu0 = resource.getrusage(resource.RUSAGE_SELF)

            load = Load(args, server.port)
            samples: list[dict[str, Any]] = []
            stop = asyncio.Event()
            start = time.monotonic()
            ramp_end = start + args.ramp
            stop_at = ramp_end + args.seconds
            sampling = asyncio.create_task(sampler(server, load, db, t0, samples, stop))
            workers = [
                asyncio.create_task(load.worker(i, start + args.ramp * i / args.streams, stop_at))
                for i in range(args.streams)
            ]
            print(
                f"soak: {args.streams} workers, ramp {args.ramp:g} s, then {args.seconds:g} s "
                f"(server pid {server.process.pid}) ...",
                flush=True,
            )
            progress = asyncio.create_task(report_progress(load, samples, start))
            await asyncio.sleep(max(0.0, ramp_end - time.monotonic()))
            procs_before = await asyncio.to_thread(cpu_by_process)
            done, pending = await asyncio.wait(
                workers, timeout=args.ramp + args.seconds + args.stream_timeout + 30
            )
            drained = time.monotonic()
            procs_after = await asyncio.to_thread(cpu_by_process)
            progress.cancel()
            for task in pending:
                task.cancel()
            crashed = [t.exception() for t in done if t.exception() is not None]
            await asyncio.sleep(3)  # let the server settle: saves, closes
            stop.set()
            await sampling
            server_cpu_s = cpu_seconds(server.ps.cpu_times()) - server_cpu0
            client_cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            after = [await sample(server, None, db, t0)]
            metrics_text = await get_text(server.port, "/metrics")
            windows = {
                "idle": (idle_from, idle_until),
                "ramp": (start, ramp_end),
                "load": (ramp_end, stop_at),
                "drain": (stop_at, drained),
            }
            lags, holds = {}, {}
            for name, (since, until) in windows.items():
                got = await get_json(server.port, f"/soak/lag?since={since}&until={until}")
                lags[name], holds[name] = got["lag_ms"], got["pool_hold_ms"]
            server_pid = server.process.pid
        exit_code = server.process.returncode
        log = scan_log(server.log)
        verification = await verify_database(dsn, warm + load.streams)
    finally:
        probe_task.cancel()
        await db.close()

    client_cpu_s = (client_cpu1.ru_utime + client_cpu1.ru_stime) - (
        client_cpu0.ru_utime + client_cpu0.ru_stime
    )
    return build_report(
        args=args, pg=pg, load=load, samples=samples, idle_samples=idle_samples, after=after,
        start=start, ramp_end=ramp_end, stop_at=stop_at, drained=drained, t0=t0, lags=lags,
        holds=holds, client_lag=probe.window(ramp_end, stop_at), server_cpu_s=server_cpu_s,
        client_cpu_s=client_cpu_s, crashed=crashed, pending=len(pending),
        metrics=store_metrics(metrics_text), log=log, verification=verification,
        exit_code=exit_code, server_pid=server_pid, placement=(server_cpu, client_cpu),
        top=top_processes(procs_before, procs_after, drained - ramp_end),
    )  # fmt: skip


async def report_progress(load: Load, samples: list[dict[str, Any]], start: float) -> None:
    while True:
        await asyncio.sleep(10)
        last = next((s for s in reversed(samples) if "rss_mb" in s), {})
        ok = sum(1 for s in load.streams if s.kind is None and not s.check.errors)
        print(
            f"  t={time.monotonic() - start:5.1f}s open={load.open_streams} streams done={len(load.streams)} "
            f"(clean {ok}) server rss={last.get('rss_mb')} MB pool out={last.get('pool_checked_out')} "
            f"pg={last.get('pg_states')} load={os.getloadavg()[0]:.2f}",
            flush=True,
        )


def git_state() -> dict[str, Any]:
    """The commit, and the files changed in the tree: the soak runs the tree as it is."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "changed": [line[3:] for line in git("status", "--porcelain").splitlines()],
    }


def rss_growth(rows: list[dict[str, Any]]) -> float | None:
    """RSS at the end of the steady window minus RSS half way through it (a leak shows up)."""
    if len(rows) < 4:
        return None
    half = rows[len(rows) // 2 :]
    return round(half[-1]["rss_mb"] - half[0]["rss_mb"], 1)


def build_report(
    *,
    args: argparse.Namespace,
    pg: PgServer,
    load: Load,
    samples: list[dict[str, Any]],
    idle_samples: list[dict[str, Any]],
    after: list[dict[str, Any]],
    start: float,
    ramp_end: float,
    stop_at: float,
    drained: float,
    t0: float,
    lags: dict[str, list[float]],
    holds: dict[str, list[float]],
    client_lag: list[float],
    server_cpu_s: float,
    client_cpu_s: float,
    crashed: list[BaseException | None],
    pending: int,
    metrics: dict[str, Any],
    log: dict[str, Any],
    verification: dict[str, Any],
    exit_code: int | None,
    server_pid: int,
    placement: tuple[int | None, int | None],
    top: list[dict[str, Any]],
) -> dict[str, Any]:
    streams = load.streams
    idle_rss = statistics.median(x["rss_mb"] for x in idle_samples)
    clean = [s for s in streams if s.kind is None and not s.check.errors]
    finished = [s for s in streams if s.kind is None]
    errors: Counter[str] = Counter()  # streams affected, by kind
    examples: dict[str, list[dict[str, Any]]] = {}
    for s in streams:
        kinds = ([s.kind] if s.kind else []) + list(s.check.errors)
        for kind in kinds:
            errors[kind] += 1
            if len(examples.setdefault(kind, [])) < 3:
                examples[kind].append(
                    {
                        "user": s.user,
                        "op": s.op,
                        "tag": s.check.tag,
                        "started_s": round(s.started - start, 2),
                        "events": s.check.collapsed()[:16],
                        "server_error": s.check.server_error,
                        "deltas_seen": len(s.check.seen),
                    }
                )
    served_errors = {
        k: n for k, n in errors.items() if k.startswith(("http_", "error_event", TITLE_NOT_SENT))
    }
    violations = {k: n for k, n in errors.items() if k not in served_errors}
    steady = [s for s in streams if ramp_end <= s.started < stop_at]
    ok_samples = [x for x in samples if "rss_mb" in x]
    steady_samples = [x for x in ok_samples if ramp_end - t0 <= x["t"] <= stop_at - t0]
    steady_samples = steady_samples or ok_samples

    def med(key: str, rows: list[dict[str, Any]] = steady_samples) -> float:
        return statistics.median(x[key] for x in rows) if rows else float("nan")

    active = med("server_active_streams")
    load_rss = med("rss_mb")
    states: dict[str, int] = {}
    for x in ok_samples:
        for state, n in x["pg_states"].items():
            states[state] = max(states.get(state, 0), n)
    in_use = [sum(n for st, n in x["pg_states"].items() if st != "idle") for x in ok_samples]
    busy_peaks: dict[str, int] = {}
    for x in ok_samples:
        for what, n in x["pg_busy"].items():
            busy_peaks[what] = max(busy_peaks.get(what, 0), n)
    busy = [statistics.fmean(x["machine_cpu_pct"]) for x in ok_samples if x.get("machine_cpu_pct")]
    lag_report = {}
    for name, values in lags.items():
        d = dist(values)
        if values:
            d["over_50ms_pct"] = round(100 * sum(v > 50 for v in values) / len(values), 3)
            d["over_100ms_pct"] = round(100 * sum(v > 100 for v in values) / len(values), 3)
        lag_report[name] = d
    deltas_checked = sum(len(s.check.received) for s in streams)
    report: dict[str, Any] = {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "machine_cpu_busy_pct_mean_during_load": round(statistics.fmean(busy), 1)
            if busy
            else None,
            "top_processes_during_load": top,
            "postgres": describe(pg),
            "server": "uvicorn, 1 worker, uvloop + httptools, JSON logs at INFO",
            "placement": {"server_cpu": placement[0], "client_cpu": placement[1]},
            "server_pid": server_pid,
            "server_exit_code": exit_code,
            "git": git_state(),
            "params": {
                "mode": getattr(args, "mode", "plain"),
                "streams": args.streams,
                "seconds": args.seconds,
                "ramp_seconds": args.ramp,
                "deltas_per_reply": args.deltas,
                "interval_ms": args.interval_ms,
                "messages_per_thread": 1 + args.followups,
                "db_pool_size": args.pool_size or "app default (10)",
                "db_max_overflow": args.max_overflow
                if args.max_overflow is not None
                else "app default (5)",
                "per_user_limits": "off (SOAK_WITHOUT_LIMITS)"
                if args.without_limits
                else "on, RATE_LIMIT_PER_MINUTE=0 and MAX_STREAMS_PER_USER=0",
            },
            "phases_s": {
                "ramp": round(ramp_end - start, 1),
                "steady": round(stop_at - ramp_end, 1),
                "drain": round(drained - stop_at, 1),
            },
        },
        "streams": {
            "total": len(streams),
            "clean": len(clean),
            "completed": len(finished),
            "broken": len(streams) - len(finished),
            "by_op": dict(Counter(s.op for s in streams)),
            "started_in_steady_window": len(steady),
            "per_second_steady": round(len(steady) / max(stop_at - ramp_end, 1e-9), 1),
            "workers_crashed": len([c for c in crashed if c is not None]),
            "workers_not_finished": pending,
            "keepalive_reconnects": load.reconnects,
            "connections_opened": load.connects,
        },
        "events": {
            "checked": sum(s.check.events for s in streams),
            "deltas_checked": deltas_checked,
            "deltas_per_second": round(deltas_checked / max(drained - start, 1e-9), 1),
            "heartbeats": sum(s.check.heartbeats for s in streams),
            "lost": sum(s.check.lost for s in finished),
            "not_sent_after_server_error": sum(s.check.not_sent for s in finished),
            "duplicated": sum(s.check.duplicated for s in streams),
            "out_of_order": sum(s.check.out_of_order for s in streams),
            "foreign": sum(s.check.foreign for s in streams),
            "deltas_missing_in_broken_streams": sum(
                args.deltas - len(s.check.seen) for s in streams if s.kind is not None
            ),
        },
        "errors_by_kind": dict(errors.most_common()),
        "errors_reported_by_server": dict(Counter(served_errors).most_common()),
        "protocol_or_transport_violations": dict(Counter(violations).most_common()),
        "error_examples": examples,
        "latency_ms": {
            "first_event_all": dist(
                [s.first_event - s.started for s in streams if s.first_event], 1000
            ),
            "first_event_steady": dist(
                [s.first_event - s.started for s in steady if s.first_event], 1000
            ),
            "first_delta_steady": dist(
                [s.first_delta - s.started for s in steady if s.first_delta], 1000
            ),
            "delta_gap": dist(load.gaps, 1000) | {"expected": args.interval_ms},
            "stream_duration_steady": dist([s.ended - s.started for s in steady], 1000),
            "stats_probe": dist([x["stats_probe_ms"] for x in ok_samples]),
        },
        "server_loop_lag_ms": lag_report,
        "client_loop_lag_ms": dist(client_lag),
        "memory": {
            "rss_idle_mb": idle_rss,
            "rss_loaded_median_mb": load_rss,
            "rss_peak_mb": max((x["rss_mb"] for x in ok_samples), default=None),
            "rss_after_drain_mb": after[0]["rss_mb"],
            "open_streams_median": active,
            "open_streams_min_steady": min(
                (x["server_active_streams"] for x in steady_samples), default=None
            ),
            "kb_per_open_stream": round((load_rss - idle_rss) * 1024 / active, 1)
            if active
            else None,
            "fds_idle": idle_samples[-1]["fds"],
            "fds_peak": max((x["fds"] for x in ok_samples), default=None),
            "asyncio_tasks_peak": max((x["asyncio_tasks"] for x in ok_samples), default=None),
            "asyncio_tasks_idle": idle_samples[-1]["asyncio_tasks"],
            "asyncio_tasks_after_drain": after[0]["asyncio_tasks"],
            "rss_growth_second_half_of_steady_mb": rss_growth(steady_samples),
        },
        "database": {
            "pg_connections_peak": max((x["pg_total"] for x in ok_samples), default=None),
            "pg_connections_idle_before": idle_samples[-1]["pg_total"],
            "pg_connections_after_drain": after[0]["pg_total"],
            "pg_state_peaks": states,
            "pg_in_use_peak": max(in_use, default=None),
            "pg_in_use_median": statistics.median(in_use) if in_use else None,
            "pg_not_idle_peaks_by_query": dict(
                sorted(busy_peaks.items(), key=lambda kv: -kv[1])[:12]
            ),
            "pg_not_idle_oldest_ms": max(
                (x["pg_busy_oldest_ms"] for x in ok_samples), default=None
            ),
            "pool_checked_out_peak": max(
                (x["pool_peak_checked_out"] for x in ok_samples), default=None
            ),
            "pool_checked_out_median_sampled": med("pool_checked_out"),
            "pool_hold_ms": {name: dist(values) for name, values in holds.items()},
            "pool_new_connections_during_load": (
                ok_samples[-1]["pool_connects"] - idle_samples[-1]["pool_connects"]
                if ok_samples
                else None
            ),
            **metrics,
        },
        "cpu": {
            "server_s": round(server_cpu_s, 1),
            "server_utilisation_pct": round(100 * server_cpu_s / max(drained - start, 1e-9), 1),
            "server_ms_per_stream": round(1000 * server_cpu_s / max(len(streams), 1), 2),
            "server_us_per_delta": round(1e6 * server_cpu_s / max(deltas_checked, 1), 1),
            "client_s": round(client_cpu_s, 1),
        },
        "database_verification": verification,
        "server_log": log,
        "timeline": samples,
    }
    e = report["events"]
    report["verdict"] = {
        "no_lost_duplicated_out_of_order_or_foreign": not (
            e["lost"] or e["duplicated"] or e["out_of_order"] or e["foreign"]
        ),
        "no_protocol_or_transport_violations": not violations,
        "no_errors_reported_by_server": not served_errors,
        "database_ok": bool(verification["ok"]),
        "server_log_clean": not any(k.startswith(("ERROR", "CRITICAL")) for k in log["problems"]),
    }
    # Integrity is what the run asserts (exit status 1 if it fails); failures the server
    # reported (503s, error events: overload) are figures of the run, not a broken protocol.
    report["integrity_held"] = (
        report["verdict"]["no_lost_duplicated_out_of_order_or_foreign"]
        and report["verdict"]["no_protocol_or_transport_violations"]
        and report["verdict"]["database_ok"]
        and not report["streams"]["workers_crashed"]
    )
    return report


def print_report(r: dict[str, Any]) -> None:
    m, st, ev, lat, mem, db, cpu = (
        r["meta"], r["streams"], r["events"], r["latency_ms"], r["memory"], r["database"], r["cpu"],
    )  # fmt: skip
    p = m["params"]
    lag = r["server_loop_lag_ms"]
    top = "; ".join(f"{x['cpu_pct']}% {x['cmd'][:60]}" for x in m["top_processes_during_load"][:5])

    def ms(d: dict[str, Any]) -> str:
        if not d.get("n"):
            return "n/a"
        return f"p50 {d['p50']:.1f} / p99 {d['p99']:.1f} / max {d['max']:.1f} ms (n={d['n']})"

    print(
        f"\nsoak: {p['streams']} concurrent streams x {p['seconds']:g} s (+{p['ramp_seconds']:g} s "
        f"ramp), one uvicorn worker; {p['deltas_per_reply']} deltas every {p['interval_ms']:g} ms"
    )
    print(
        f"  PostgreSQL: {m['postgres']['kind']}; pool {p['db_pool_size']} + {p['db_max_overflow']}; "
        f"per-user limits {p['per_user_limits']}; "
        f"load average at end {m['loadavg_at_end']}, machine CPU busy "
        f"{m['machine_cpu_busy_pct_mean_during_load']}% ({m['cpus']} CPUs)"
    )
    print(f"  busiest processes during the load (% of one CPU): {top}")
    print(
        f"  streams: {st['total']} ({st['clean']} clean, {st['completed']} completed, "
        f"{st['broken']} broken); {st['per_second_steady']}/s in the steady window; "
        f"open (server) median {mem['open_streams_median']}, min {mem['open_streams_min_steady']}"
    )
    print(
        f"  events checked: {ev['checked']} ({ev['deltas_checked']} deltas, "
        f"{ev['deltas_per_second']}/s); lost {ev['lost']}, duplicated {ev['duplicated']}, "
        f"out of order {ev['out_of_order']}, foreign {ev['foreign']} (not sent after a "
        f"server error: {ev['not_sent_after_server_error']})"
    )
    print(f"  errors reported by the server: {r['errors_reported_by_server'] or 'none'}")
    print(f"  protocol / transport violations: {r['protocol_or_transport_violations'] or 'none'}")
    print(f"  first event (steady): {ms(lat['first_event_steady'])}")
    print(f"  first event (all):    {ms(lat['first_event_all'])}")
    print(f"  first delta (steady): {ms(lat['first_delta_steady'])}")
    print(f"  gap between deltas:   {ms(lat['delta_gap'])} (scripted {p['interval_ms']:g} ms)")
    print(f"  server loop lag, loaded: {ms(lag['load'])}; idle: {ms(lag['idle'])}")
    print(f"  client loop lag, loaded: {ms(r['client_loop_lag_ms'])}")
    print(
        f"  server RSS: idle {mem['rss_idle_mb']} MB, loaded {mem['rss_loaded_median_mb']} MB "
        f"(peak {mem['rss_peak_mb']}, after drain {mem['rss_after_drain_mb']}) -> "
        f"{mem['kb_per_open_stream']} KB per open stream; growth over the second half of the "
        f"steady window {mem['rss_growth_second_half_of_steady_mb']} MB; asyncio tasks idle "
        f"{mem['asyncio_tasks_idle']}, after drain {mem['asyncio_tasks_after_drain']}"
    )
    print(
        f"  DB connections (pg_stat_activity): peak {db['pg_connections_peak']} "
        f"(in use peak {db['pg_in_use_peak']}, median {db['pg_in_use_median']}; states "
        f"{db['pg_state_peaks']}); pool checked out peak {db['pool_checked_out_peak']}, "
        f"new connections during load {db['pool_new_connections_during_load']}"
    )
    print(
        f"  not idle, by query (peak): {db['pg_not_idle_peaks_by_query'] or 'none'}; oldest "
        f"{db['pg_not_idle_oldest_ms']} ms"
    )
    print(f"  store calls, mean ms: {db['store_call_mean_ms']}")
    print(f"  pool connection held (checkout to checkin), loaded: {ms(db['pool_hold_ms']['load'])}")
    print(
        f"  CPU: server {cpu['server_s']} s ({cpu['server_utilisation_pct']}% of a core), "
        f"{cpu['server_us_per_delta']} us per delta all in; client {cpu['client_s']} s"
    )
    v = r["database_verification"]
    print(
        f"  database: {v['replies_checked']} replies checked, missing {v['replies_missing']}, "
        f"text mismatch {v['replies_text_mismatch']}, extra rows {v['extra_assistant_rows']}; "
        f"item rows {v['item_rows_by_type']}; threads {v['threads_stored']}/"
        f"{v['threads_created_by_client']}"
    )
    log = r["server_log"]
    print(f"  server log: {log['lines_by_level']}, {log['non_json_lines']} lines not JSON")
    for problem, n in list(log["problems"].items())[:8]:
        print(f"    {n:6d} x {problem}")
    print(f"  verdict: {r['verdict']}")
    failed = sum(r["errors_reported_by_server"].values())
    print(
        f"  RESULT: integrity {'held' if r['integrity_held'] else 'BROKEN'}; "
        f"{failed} of {st['total']} streams failed by the server "
        f"({100 * failed / max(st['total'], 1):.1f}%)"
    )


@contextlib.contextmanager
def database_server() -> Iterator[PgServer]:
    if not os.environ.get("TEST_DATABASE_URL", "").strip() and (
        url := os.environ.get("DATABASE_URL", "").strip()
    ):
        yield PgServer(normalise_database_url(url), "DATABASE_URL")
        return
    with postgres_server() as server:
        yield server


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams (users)")
    parser.add_argument("--seconds", type=float, default=60, help="time at full concurrency")
    parser.add_argument("--ramp", type=float, default=5, help="seconds to start every worker")
    parser.add_argument("--deltas", type=int, default=60, help="text deltas per reply")
    parser.add_argument("--interval-ms", type=float, default=250, help="pause between deltas")
    parser.add_argument("--followups", type=int, default=3, help="messages added per thread")
    parser.add_argument("--stream-timeout", type=float, default=120, help="per stream, seconds")
    parser.add_argument("--pool-size", type=int, default=0, help="DB_POOL_SIZE (0: app default)")
    parser.add_argument("--max-overflow", type=int, default=None, help="DB_MAX_OVERFLOW")
    parser.add_argument(
        "--without-limits",
        action="store_true",
        help="switch the per-user limits (stream leases) off, to measure what they cost",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help="comma-separated, run one after the other: plain, resumable (X-Chatkit-Resumable)",
    )
    parser.add_argument(
        "--resumable", action="store_true", help="the resumable mode alone (--modes resumable)"
    )
    parser.add_argument("--pin", action="store_true", help="server on CPU 0, client on CPU 1")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database")
    args = parser.parse_args(argv)
    args.modes = ["resumable"] if args.resumable else [m for m in args.modes.split(",") if m]
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes: a comma-separated list of {', '.join(MODES)}")
    return args


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    limit = raise_fd_limit()
    if limit < args.streams + 100:
        raise SystemExit(f"file descriptor limit {limit} is too low for {args.streams} streams")
    reports: dict[str, dict[str, Any]] = {}
    with database_server() as pg:
        for mode in args.modes:
            began = time.perf_counter()
            load_at_start = [round(x, 2) for x in os.getloadavg()]
            url = asyncio.run(pg.create_database(f"ckpg_soak_{mode}"))
            try:
                migrate(url)
                report = asyncio.run(soak(url, pg, argparse.Namespace(**vars(args), mode=mode)))
            finally:
                if args.keep_db:
                    print(f"database kept: {url}")
                else:
                    asyncio.run(pg.drop_database(url))
            report["meta"]["loadavg_at_start"] = load_at_start
            report["meta"]["total_s"] = round(time.perf_counter() - began, 1)
            print(f"\n===== mode: {mode} =====")
            print_report(report)
            reports[mode] = report
    result: dict[str, Any] = {
        "modes": reports,
        "comparison": compare(reports),
        "integrity_held": all(r["integrity_held"] for r in reports.values()),
    }
    print_comparison(result["comparison"])
    path = RESULTS_DIR / "soak.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    total = sum(r["meta"]["total_s"] for r in reports.values())
    print(f"soak: {total:.1f} s in all; figures in {path}")
    return result


if __name__ == "__main__":
    result = run(sys.argv[1:])
    sys.exit(0 if result["integrity_held"] else 1)
