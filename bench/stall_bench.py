"""``python -m bench stall``: the server's memory with clients that never read.

    python -m bench.stall_bench [--streams 100] [--rounds 2] [--deltas 4000] [--interval-ms 0]

One uvicorn worker serves ``bench.soak_app`` (the real app, a scripted model streaming numbered
deltas as fast as it is let). This process opens ``--streams`` raw TCP connections on loopback
with a small receive buffer (``SO_RCVBUF`` 4 KiB), sends each a ``threads.create`` asking for a
long reply (``--deltas`` deltas, ``--interval-ms`` apart; 4,000 deltas is ~0.7 MB of SSE) and
never reads a byte. The server's RSS is sampled idle (after a warm-up of complete streams), at
``--at`` seconds after the requests were sent, and ``--after`` seconds after the clients
closed and the server has ended every stream; then the next round starts (memory the first
round used must be reused by the second, not added to). Figures are ratios to the idle RSS of
the same run.

Then PostgreSQL is checked: every reply is kept as on a disconnect (its user message, the
assistant message so far, and the SDK's "cancelled" marker).

What grew before (the issue measured 162 → 508 MB in 30 s with 100 such streams): not the
bytes waiting for the clients (on loopback the kernel's autotuned socket buffers, outside the
process, held all of them), but the Agents SDK's queue of model events, filled as fast as the
model wrote while the process, short of CPU, turned them into ChatKit events more slowly;
reading clients grew it just as much. ``app.chat.agent_run.PacedModel`` bounds that queue;
``STREAM_BUFFER_BYTES`` and ``STREAM_STALL_SECONDS`` bound what waits for a client (app.http.sse).
Results: ``bench/results/stall.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import time
from collections import Counter
from typing import Any

import asyncpg

from bench import RESULTS_DIR
from bench.httpload import chatkit, user_input
from bench.soak import (
    database_server,
    get_json,
    raise_fd_limit,
    server_process,
    token,
)
from tests.harness.pg import PgServer, migrate

SMALL_RCVBUF = 4096
IDLE_SAMPLES = 6
SAMPLE_GAP = 0.5


def rss_mb(server: Any) -> float:
    return round(float(server.ps.memory_info().rss) / 2**20, 1)


async def idle_rss(server: Any) -> float:
    samples = []
    for _ in range(IDLE_SAMPLES):
        samples.append(rss_mb(server))
        await asyncio.sleep(SAMPLE_GAP)
    return statistics.median(samples)


async def complete_stream(port: int, user: str, text: str) -> bytes:
    """One stream read to its end (the warm-up: every code path loaded, connections open)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = chatkit("threads.create", {"input": user_input(text)}, token(user))
    writer.write(request.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1))
    body = await reader.read()
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return body


async def never_reading_client(port: int, request: bytes) -> socket.socket:
    """Sends ``request`` and never reads: the socket is returned, to be closed later."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request)
    return sock


async def wait_streams_ended(port: int, timeout: float) -> dict[str, Any]:
    """Polls the server until it has no open stream and no background task left."""
    end = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = await get_json(port, "/soak/stats")
        if stats["active_streams"] == 0 and stats["background_tasks"] == 0:
            return stats
        if time.monotonic() > end:
            return stats
        await asyncio.sleep(0.2)


async def kept_replies(dsn: str, users: list[str]) -> dict[str, int]:
    """How each stalled user's reply was kept: complete, partial with the "cancelled" marker,
    or missing (no assistant message: nothing of the reply kept)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT user_id, type, count(*) AS n FROM chatkit_items "
            "WHERE user_id = ANY($1::text[]) GROUP BY 1, 2",
            users,
        )
    finally:
        await conn.close()
    per_user: dict[str, Counter[str]] = {u: Counter() for u in users}
    for r in rows:
        per_user[r["user_id"]][r["type"]] = r["n"]
    outcome: Counter[str] = Counter()
    for counts in per_user.values():
        if counts["assistant_message"] != 1 or counts["user_message"] != 1:
            outcome["missing_or_duplicated"] += 1
        elif counts["sdk_hidden_context"]:
            outcome["cut_partial_kept"] += 1
        else:
            outcome["complete"] += 1
    return dict(outcome)


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    server_args = argparse.Namespace(pool_size=0, max_overflow=None, without_limits=False)
    extra = {"STREAM_STALL_SECONDS": str(args.stall_seconds)} if args.stall_seconds else {}
    with server_process(
        url, server_args, None, extra_env=extra, log_name="stall-server.log"
    ) as server:
        port = server.port
        for i in range(5):
            await complete_stream(port, f"warm-{i}", "soak deltas=200 interval_ms=0 tag=warm")
        await asyncio.sleep(2)
        idle = await idle_rss(server)

        rounds = []
        users: list[str] = []
        for n in range(args.rounds):
            group = [f"stall-{n}-{i:04d}" for i in range(args.streams)]
            users += group
            rounds.append(await stalled_round(server, group, args))
    kept = await kept_replies(PgServer.dsn(url), users)
    peak = max(max(r["rss_during_mb"].values()) for r in rounds)
    return {
        "meta": {
            "streams": args.streams,
            "rounds": args.rounds,
            "deltas": args.deltas,
            "interval_ms": args.interval_ms,
            "client_rcvbuf": SMALL_RCVBUF,
            "stall_seconds": args.stall_seconds or "default",
            "cpu_count": os.cpu_count(),
        },
        "rss_idle_mb": idle,
        "rounds": rounds,
        "during_peak_ratio": round(peak / idle, 2),
        "after_ratio": round(rounds[-1]["rss_after_mb"] / idle, 2),
        "mb_per_stalled_stream": round((peak - idle) / args.streams, 2),
        "replies_kept": kept,
    }


async def stalled_round(server: Any, users: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """``users`` each open a stream and never read; RSS at ``args.at``; then they close."""
    port = server.port
    text = f"soak deltas={args.deltas} interval_ms={args.interval_ms:g} tag=stall"
    requests = [chatkit("threads.create", {"input": user_input(text)}, token(u)) for u in users]
    print(f"stall: {len(users)} clients that never read (server pid {server.process.pid})")
    socks = await asyncio.gather(*(never_reading_client(port, r) for r in requests))
    sent_at = time.monotonic()
    during: dict[str, float] = {}
    open_streams: dict[str, int] = {}
    for at in args.at:
        await asyncio.sleep(max(0.0, sent_at + at - time.monotonic()))
        during[f"{at:g}s"] = rss_mb(server)
        stats = await get_json(port, "/soak/stats")
        open_streams[f"{at:g}s"] = int(stats["active_streams"])
        print(f"  t={at:g}s rss={during[f'{at:g}s']} MB open streams={stats['active_streams']}")
    for sock in socks:
        sock.close()
    closed_at = time.monotonic()
    ended = await wait_streams_ended(port, timeout=60)
    ended_after = time.monotonic() - closed_at
    await asyncio.sleep(args.after)
    after = rss_mb(server)
    print(f"  {args.after:g}s after they closed: rss={after} MB")
    return {
        "rss_during_mb": during,
        "open_streams_during": open_streams,
        "rss_after_mb": after,
        "streams_ended_s_after_close": round(ended_after, 2),
        "open_after_close": int(ended["active_streams"]),
    }


def print_report(r: dict[str, Any]) -> None:
    print(
        f"\nstall: {r['meta']['rounds']} rounds of {r['meta']['streams']} clients that never "
        f"read, {r['meta']['deltas']} deltas each; RSS idle {r['rss_idle_mb']} MB"
    )
    for n, rnd in enumerate(r["rounds"], 1):
        during = ", ".join(f"{k} {v}" for k, v in rnd["rss_during_mb"].items())
        print(f"  round {n}: during {during} MB; {rnd['rss_after_mb']} MB after they closed")
    print(
        f"  ratio to idle: peak {r['during_peak_ratio']}x, after {r['after_ratio']}x; "
        f"{r['mb_per_stalled_stream']} MB per stalled stream\n"
        f"  replies kept: {r['replies_kept']}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.stall_bench")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--deltas", type=int, default=4000, help="text deltas per reply")
    parser.add_argument("--interval-ms", type=float, default=0, help="pause between deltas")
    parser.add_argument(
        "--at", type=float, nargs="+", default=[5, 15, 30], help="seconds to sample RSS at"
    )
    parser.add_argument("--after", type=float, default=5, help="seconds after the close")
    parser.add_argument(
        "--stall-seconds", type=float, default=0, help="STREAM_STALL_SECONDS (0: default)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of clients (memory reused, not leaked)"
    )
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """``argv`` None (``python -m bench stall``): the defaults."""
    args = parse_args(argv or [])
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    with database_server() as pg:
        url = asyncio.run(pg.create_database("ckpg_stall"))
        try:
            migrate(url)
            report = asyncio.run(measure(url, args))
        finally:
            asyncio.run(pg.drop_database(url))
    print_report(report)
    path = RESULTS_DIR / "stall.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    run(sys.argv[1:])
