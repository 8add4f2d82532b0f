"""``make soak-reconnect``: resumable replies (docs/runs.md) cut and resumed, through two
processes, every event checked. A load run, not a timed test (issue 21).

    python -m bench.reconnect_soak [--streams 200] [--deltas 60] [--interval-ms 250] [--seed N]

Two uvicorn workers (A and B, uvloop, httptools) serve ``bench.soak_app`` (the real app, the
scripted model streaming numbered deltas) on the same PostgreSQL database. ``--streams`` users
each start one opted-in reply (``X-Chatkit-Resumable: true``), half on A and half on B, all at
once over ``--ramp`` seconds. Each stream is cut 1 to 3 times (the client closes its
connection right after the event a seeded RNG picked, somewhere among the deltas), waits a
random 0.2 to 1 s (so the events it misses exist by then) and resumes with ``GET
{CHATKIT_PATH}/runs/<run_id>/events`` and ``Last-Event-ID: <run_id>:<last seq>``; resumes
alternate between the two processes, so half of them go through the process that does not run
the reply (it reads the log) and half through the one that does (it reads memory). The seed
is printed; ``--seed`` replays a run's cut points.

Checked: every event of a reply, across all its connections, carries ``id: <run_id>:<seq>``
with ``seq`` the next one (from 1, no gap, no repeat); every delta exactly once, in order, in
its own reply; the ChatKit events in the expected order and the final text equal to the deltas
joined (``bench.soak.StreamCheck``); each resume starts with ``X-Chatkit-Run`` of its run; and
afterwards PostgreSQL holds each reply exactly once with its full text. Measured: resume
latency, from the moment the client reconnects (before ``connect()``) to the first event it
had missed, overall and by where the resume went (same process as the run, or the other).

Exit status 1 when integrity fails. Database: as ``bench.soak`` (``TEST_DATABASE_URL``, else
``DATABASE_URL``, else ``tests.harness.pg``). Results: ``bench/results/reconnect_soak.json``,
the servers' logs in ``bench/results/reconnect-server-{a,b}.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from bench import RESULTS_DIR
from bench.httpload import Connection, chatkit, http_request, user_input
from bench.soak import (
    ITEMS_SQL,
    RESUMABLE,
    Server,
    StreamBroken,
    StreamCheck,
    close,
    database_server,
    dist,
    raise_fd_limit,
    read_head,
    scan_log,
    server_process,
    token,
)
from bench.soak_app import delta_text
from tests.harness.pg import PgServer, describe, migrate


@dataclass
class Resume:
    target: str  # "same" (the run's process) or "other"
    latency: float | None = None  # reconnect -> first missed event, seconds
    failure: str | None = None


@dataclass
class Reply:
    """One opted-in reply, across its connections."""

    index: int
    origin: int  # the process running it (0 = A, 1 = B)
    cuts: list[int]  # the seqs after which the client closes its connection
    pauses: list[float]
    check: StreamCheck
    resumes: list[Resume] = field(default_factory=list)
    failure: str | None = None
    started: float = 0.0
    ended: float = 0.0
    unnumbered: list[str] = field(default_factory=list)  # types of events without an ``id:``

    @property
    def user(self) -> str:
        return f"resume-{self.index:04d}"


def plan(args: argparse.Namespace, rng: random.Random) -> list[Reply]:
    replies = []
    for i in range(args.streams):
        n = rng.randint(1, 3)
        cuts = sorted(rng.sample(range(1, args.deltas + 5), n))
        pauses = [rng.uniform(0.2, 1.0) for _ in cuts]
        tag = f"r{i:04d}"
        check = StreamCheck("threads.create", tag, args.deltas)
        replies.append(Reply(i, i % 2, cuts, pauses, check))
    return replies


async def read_until(conn: Connection, reply: Reply, cut: int | None, first: list[float]) -> bool:
    """Events of a chunked SSE body into the reply's check, one at a time; returns True at
    the event numbered ``cut`` (the rest is left unread: the client goes away), False at the
    end of the response."""
    reader, check = conn.reader, reply.check
    buffer = bytearray()
    while True:
        line = await reader.readline()
        if not line:
            raise StreamBroken("connection_closed_mid_stream")
        size = int(line.split(b";", 1)[0], 16)
        if size == 0:
            return False
        buffer += await reader.readexactly(size)
        await reader.readexactly(2)
        while (end := buffer.find(b"\n\n")) >= 0:
            block = bytes(buffer[:end])
            del buffer[: end + 2]
            if block.startswith(b":"):
                continue  # a heartbeat
            lines = block.split(b"\n")
            data = [ln[6:] for ln in lines if ln.startswith(b"data: ")]
            if not data:
                check.errors["event_without_data"] += 1
                continue
            if not first:
                first.append(time.monotonic())
            before = check.last_seq
            event_id = next((ln[4:] for ln in lines if ln.startswith(b"id: ")), None)
            check.event_id(event_id)
            event = json.loads(b"\n".join(data))
            if event_id is None:
                reply.unnumbered.append(str(event.get("type")))
            check.event(event, time.monotonic())
            if cut is not None and check.last_seq == cut and before != cut:
                return True


async def one_reply(reply: Reply, servers: list[Server], args: argparse.Namespace) -> None:
    user = reply.user
    tok = token(user)
    check = reply.check
    text = f"soak deltas={args.deltas} interval_ms={args.interval_ms:g} tag={check.tag}"
    request = chatkit("threads.create", {"input": user_input(text)}, tok)
    request = request.replace(b"\r\n\r\n", b"\r\n" + RESUMABLE + b"\r\n\r\n", 1)
    reply.started = time.monotonic()
    conn: Connection | None = None
    try:
        async with asyncio.timeout(args.stream_timeout):
            conn = await Connection.open(servers[reply.origin].port)
            conn.writer.write(request)
            status, headers = await read_head(conn)
            if status != 200 or not headers.get(b"x-chatkit-run"):
                raise StreamBroken(f"start_http_{status}")
            run_id = headers[b"x-chatkit-run"].decode()
            check.run_id = run_id
            cuts = list(reply.cuts)
            cut_now = await read_until(conn, reply, cuts[0], [])
            k = 0
            while cut_now:
                await close(conn)  # the cut: this client goes away mid-stream
                conn = None
                await asyncio.sleep(reply.pauses[k])
                target = (reply.index // 2 + k) % 2
                resume = Resume("same" if target == reply.origin else "other")
                reply.resumes.append(resume)
                since = time.monotonic()
                conn = await Connection.open(servers[target].port)
                get = http_request("GET", f"/chatkit/runs/{run_id}/events", b"", tok)
                last = f"Last-Event-ID: {run_id}:{check.last_seq}".encode()
                conn.writer.write(get.replace(b"\r\n\r\n", b"\r\n" + last + b"\r\n\r\n", 1))
                status, headers = await read_head(conn)
                if status != 200:
                    resume.failure = f"resume_http_{status}"
                    raise StreamBroken(resume.failure)
                if headers.get(b"x-chatkit-run", b"").decode() != run_id:
                    check.errors["resume_without_run_header"] += 1
                k += 1
                first: list[float] = []
                cut_now = await read_until(conn, reply, cuts[k] if k < len(cuts) else None, first)
                if first:
                    resume.latency = first[0] - since
                else:
                    resume.failure = "resume_without_events"
            check.finish()
    except StreamBroken as exc:
        reply.failure = exc.kind
    except TimeoutError:
        reply.failure = "timeout"
    except (ConnectionError, OSError, ValueError) as exc:
        reply.failure = f"{type(exc).__name__}"
    finally:
        if conn is not None:
            await close(conn)
        reply.ended = time.monotonic()


async def soak(url: str, args: argparse.Namespace, replies: list[Reply]) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                server_process(url, args, None, log_name=f"reconnect-server-{name}.log")
            )
            for name in ("a", "b")
        ]
        started = time.monotonic()
        print(
            f"reconnect soak: {len(replies)} replies on A (pid {servers[0].process.pid}) and "
            f"B (pid {servers[1].process.pid}), seed {args.seed} ...",
            flush=True,
        )

        async def delayed(reply: Reply) -> None:
            await asyncio.sleep(args.ramp * reply.index / len(replies))
            await one_reply(reply, servers, args)

        await asyncio.gather(*(delayed(r) for r in replies))
        elapsed = time.monotonic() - started
        cpu = [s.ps.cpu_times() for s in servers]
    logs = {name: scan_log(s.log) for name, s in zip("ab", servers, strict=True)}
    verification = await verify_replies(PgServer.dsn(url), replies, args.deltas)
    return {
        "elapsed_s": round(elapsed, 1),
        "server_cpu_s": [round(c.user + c.system, 1) for c in cpu],
        "server_logs": logs,
        "database_verification": verification,
    }


async def verify_replies(dsn: str, replies: list[Reply], deltas: int) -> dict[str, Any]:
    """PostgreSQL holds each reply once: a reply the client saw complete, with its full text; a
    reply that ended with an ``error`` event (a run declared lost, docs/runs.md), at most one
    partial assistant message whose text begins the reply's, and the SDK's cancel marker; and
    nothing in any thread the client did not create."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(ITEMS_SQL)
    finally:
        await conn.close()
    by_thread: dict[tuple[str, str], list[Any]] = {}
    for row in rows:
        by_thread.setdefault((row["user_id"], row["thread_id"]), []).append(row)
    out: Counter[str] = Counter()
    known = set()
    for r in replies:
        check = r.check
        if check.thread_id is None:
            continue
        known.add((r.user, check.thread_id))
        items = by_thread.get((r.user, check.thread_id), [])
        assistant = [x for x in items if x["type"] == "assistant_message"]
        users = [x for x in items if x["type"] == "user_message"]
        expected = "".join(delta_text(check.tag, n) for n in range(1, deltas + 1))
        out["user_message_stored_twice"] += len(users) > 1
        # A reply that failed before the user's message was saved (its ``user_message.done``
        # never came) may leave the thread without it, as an un-opted stream does.
        out["user_message_seen_not_stored"] += check.user_item_id is not None and not users
        if check.server_error is None and r.failure is None:
            out["complete_replies"] += 1
            out["complete_reply_not_stored_once"] += len(assistant) != 1
            out["complete_reply_text_wrong"] += bool(assistant) and assistant[0]["text"] != expected
            out["complete_reply_with_other_items"] += len(items) != 2
        else:
            out["failed_replies"] += 1
            out["failed_reply_partial_stored"] += len(assistant) == 1
            out["failed_reply_stored_twice"] += len(assistant) > 1
            out["failed_reply_text_not_a_prefix"] += any(
                not expected.startswith(x["text"] or "") for x in assistant
            )
    out["rows_in_unknown_threads"] = sum(len(v) for k, v in by_thread.items() if k not in known)
    result: dict[str, Any] = dict(out)
    result["item_rows_by_type"] = dict(Counter(r["type"] for r in rows))
    counted = ("complete_replies", "failed_replies", "failed_reply_partial_stored")
    result["ok"] = not any(n for k, n in out.items() if k not in counted)
    return result


def report(
    args: argparse.Namespace, replies: list[Reply], run: dict[str, Any], pg: PgServer
) -> dict[str, Any]:
    resumes = [x for r in replies for x in r.resumes]
    errors: Counter[str] = Counter()
    for r in replies:
        for kind in ([r.failure] if r.failure else []) + list(r.check.errors):
            errors[kind] += 1
    finished = [r for r in replies if r.failure is None]
    events = {
        "checked": sum(r.check.events for r in replies),
        "deltas_checked": sum(len(r.check.received) for r in replies),
        "lost": sum(r.check.lost for r in finished),
        "duplicated": sum(r.check.duplicated for r in replies),
        "out_of_order": sum(r.check.out_of_order for r in replies),
        "foreign": sum(r.check.foreign for r in replies),
        "seq_not_next": sum(r.check.errors["event_id_not_next_seq"] for r in replies),
    }
    latency = {
        "all": dist([x.latency for x in resumes if x.latency is not None], 1000),
        "same_process": dist(
            [x.latency for x in resumes if x.latency is not None and x.target == "same"], 1000
        ),
        "other_process": dist(
            [x.latency for x in resumes if x.latency is not None and x.target == "other"], 1000
        ),
    }
    served = ("http_", "error_event", "start_http_", "resume_http_")
    violations = {k: n for k, n in errors.items() if not k.startswith(served)}
    integrity = (
        not violations
        and not any(v for k, v in events.items() if k not in ("checked", "deltas_checked"))
        and bool(run["database_verification"]["ok"])
    )
    return {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seed": args.seed,
            "postgres": describe(pg),
            "servers": "2 uvicorn processes (A, B), 1 worker each, uvloop + httptools",
            "loadavg_at_start": args.loadavg_at_start,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(),
            "params": {
                "streams": args.streams,
                "deltas_per_reply": args.deltas,
                "interval_ms": args.interval_ms,
                "ramp_s": args.ramp,
                "cuts_per_reply": "1-3, after a random event among the deltas",
                "pause_before_resume_s": "0.2-1.0",
            },
        },
        "elapsed_s": run["elapsed_s"],
        "server_cpu_s": run["server_cpu_s"],
        "replies": {
            "total": len(replies),
            "completed": len(finished),
            "by_cuts": dict(sorted(Counter(len(r.cuts) for r in replies).items())),
        },
        "resumes": {
            "total": len(resumes),
            "same_process": sum(1 for x in resumes if x.target == "same"),
            "other_process": sum(1 for x in resumes if x.target == "other"),
            "failed": dict(Counter(x.failure for x in resumes if x.failure)),
        },
        "events": events,
        "errors_by_kind": dict(errors.most_common()),
        "protocol_or_transport_violations": violations,
        "error_examples": examples(replies),
        "events_without_id_by_type": dict(Counter(t for r in replies for t in r.unnumbered)),
        "resume_latency_ms": latency,
        "database_verification": run["database_verification"],
        "server_logs": run["server_logs"],
        "integrity_held": integrity,
    }


def examples(replies: list[Reply]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in replies:
        for kind in ([r.failure] if r.failure else []) + list(r.check.errors):
            if len(out.setdefault(kind, [])) < 3:
                out[kind].append(
                    {
                        "reply": r.index,
                        "origin": "AB"[r.origin],
                        "cuts": r.cuts,
                        "resumes": [(x.target, x.failure) for x in r.resumes],
                        "last_seq": r.check.last_seq,
                        "events": r.check.collapsed()[-6:],
                        "unnumbered": r.unnumbered,
                        "server_error": r.check.server_error,
                    }
                )
    return out


def print_report(r: dict[str, Any]) -> None:
    def ms(d: dict[str, Any]) -> str:
        if not d.get("n"):
            return "n/a"
        return f"p50 {d['p50']:.1f} / p99 {d['p99']:.1f} / max {d['max']:.1f} ms (n={d['n']})"

    m, ev, res, lat = r["meta"], r["events"], r["resumes"], r["resume_latency_ms"]
    print(
        f"\nreconnect soak: {r['replies']['total']} resumable replies of "
        f"{m['params']['deltas_per_reply']} deltas every {m['params']['interval_ms']:g} ms, "
        f"two processes, seed {m['seed']}; {r['elapsed_s']} s; load average "
        f"{m['loadavg_at_start']} -> {m['loadavg_at_end']}"
    )
    print(
        f"  replies completed {r['replies']['completed']}; cuts per reply {r['replies']['by_cuts']}"
    )
    print(
        f"  resumes {res['total']} ({res['same_process']} through the run's process, "
        f"{res['other_process']} through the other); failed {res['failed'] or 'none'}"
    )
    print(
        f"  events checked {ev['checked']} ({ev['deltas_checked']} deltas): lost {ev['lost']}, "
        f"duplicated {ev['duplicated']}, out of order {ev['out_of_order']}, foreign "
        f"{ev['foreign']}, seq not the next {ev['seq_not_next']}"
    )
    print(f"  errors: {r['errors_by_kind'] or 'none'}")
    print(f"  protocol / transport violations: {r['protocol_or_transport_violations'] or 'none'}")
    print(f"  resume latency (reconnect -> first missed event): {ms(lat['all'])}")
    print(f"    through the run's process: {ms(lat['same_process'])}")
    print(f"    through the other process: {ms(lat['other_process'])}")
    print(f"  events without an id, by type: {r['events_without_id_by_type'] or 'none'}")
    print(f"  database: {r['database_verification']}")
    for name, log in r["server_logs"].items():
        print(f"  server {name.upper()} log: {log['lines_by_level']}; problems {log['problems']}")
    print(f"  RESULT: integrity {'held' if r['integrity_held'] else 'BROKEN'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reconnect_soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--streams", type=int, default=200, help="resumable replies at once")
    parser.add_argument("--deltas", type=int, default=60, help="text deltas per reply")
    parser.add_argument(
        "--interval-ms", type=float, default=250, help="pause between deltas (the soak's)"
    )
    parser.add_argument("--ramp", type=float, default=2, help="seconds to start every reply")
    parser.add_argument("--seed", type=int, default=None, help="the cut points' RNG seed")
    parser.add_argument("--stream-timeout", type=float, default=180, help="per reply, seconds")
    args = parser.parse_args(argv)
    # What bench.soak.server_process reads: the app's default pool, its limits on.
    args.pool_size, args.max_overflow, args.without_limits = 0, None, False
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    return args


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    args.loadavg_at_start = [round(x, 2) for x in os.getloadavg()]
    replies = plan(args, random.Random(args.seed))
    with database_server() as pg:
        url = asyncio.run(pg.create_database("ckpg_reconnect_soak"))
        try:
            migrate(url)
            outcome = asyncio.run(soak(url, args, replies))
        finally:
            asyncio.run(pg.drop_database(url))
    result = report(args, replies, outcome, pg)
    print_report(result)
    path = RESULTS_DIR / "reconnect_soak.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"figures in {path}")
    return result


if __name__ == "__main__":
    sys.exit(0 if run(sys.argv[1:])["integrity_held"] else 1)
