"""Part 1 of the server benchmark: ``threads.list`` and ``items.list`` throughput against three
baselines measured in the same run (issue 14).

* **chatkit-pg**: the real app (``bench.server_app``): JWT auth, request parsing, the per-user
  limiter (on, never refusing), ownership checks, PostgreSQL.
* **floor** (``bench.floor_app``): JWT check + one asyncpg query on our tables + the stored
  JSON joined into the page, nothing else. Target: chatkit-pg >= 0.6x.
* **tutorial** (``bench.tutorial_app``): the SDK's ``ChatKitServer`` over an in-memory dict
  store behind a FastAPI route with a JWT check. Target: chatkit-pg >= 5x.
* **bare**: a FastAPI route in chatkit-pg's process answering stored bytes of the same JSON
  (the HTTP stack alone).

Same data everywhere (the floor reads the app's database, the tutorial copies it at startup),
the same request bytes and bearer token; the pages are checked to hold the same rows in the same
order before anything is timed. Each round loads every side once, the order alternating between
rounds; ratios are given paired per round (the headline) and of the medians.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any

from bench import RESULTS_DIR
from bench.floor_app import APPLICATION_NAME as FLOOR_APP_NAME
from bench.httpload import (
    APP_NAME,
    Connection,
    LoadResult,
    Server,
    backend_pids,
    chatkit,
    fetch,
    http_request,
    load,
    user_input,
)

THREADS = 30  # threads of the one user
ITEMS = 10  # items per thread (a user message and a reply per turn) ...
BIG_ITEMS = 30  # ... but the thread items.list reads holds more, so its page is full too
PAGE = 20
LOAD_SECONDS = 3.0
WARMUP_SECONDS = 1.0
ROUNDS = 5

BASELINES = ("floor", "tutorial", "bare")
TARGETS = {"floor": 0.6, "tutorial": 5.0}  # chatkit-pg's req/s over the baseline's, at least
# The floor answers jsonb's text form (a space after each ':' and ','), ~16% bigger than the
# compact JSON chatkit-pg writes for items; more than this means different content.
SIZE_TOLERANCE = 0.25


async def seed(port: int, token: str) -> str:
    """THREADS threads of ITEMS items through the app's API, the last one of BIG_ITEMS.
    Returns the big thread's id."""
    conn = await Connection.open(port)

    async def turn(type_: str, params: dict[str, Any]) -> bytes:
        status, body = await conn.roundtrip(chatkit(type_, params, token))
        assert status == 200, body[:300]
        return body

    thread_id = ""
    for n in range(THREADS):
        body = await turn("threads.create", {"input": user_input(f"deltas:5 thread {n}")})
        thread_id = json.loads(body.split(b"\n\n")[0][len(b"data: ") :])["thread"]["id"]
        items = BIG_ITEMS if n == THREADS - 1 else ITEMS
        for m in range(items // 2 - 1):
            params = {"thread_id": thread_id, "input": user_input(f"deltas:5 message {m}")}
            await turn("threads.add_user_message", params)
    await conn.close()
    return thread_id


@dataclass
class Side:
    server: Server
    request: bytes
    db_app: str | None  # the application_name of its PostgreSQL backends, if any
    body: bytes = b""


def _page_check(op: str, bodies: dict[str, bytes]) -> dict[str, Any]:
    """Every side answers the same rows in the same order; the floor's body about as big."""
    pages = {side: json.loads(body) for side, body in bodies.items()}
    ids = {side: [row["id"] for row in page["data"]] for side, page in pages.items()}
    reference = ids["chatkit"]
    if len(reference) != PAGE:
        raise RuntimeError(f"{op}: chatkit-pg answered {len(reference)} rows, not {PAGE}")
    for side, page in pages.items():
        if ids[side] != reference or page["has_more"] != pages["chatkit"]["has_more"]:
            raise RuntimeError(f"{op}: the {side} page differs from chatkit-pg's: {ids[side]}")
    size = {side: len(body) for side, body in bodies.items()}
    drift = size["floor"] / size["chatkit"] - 1
    if abs(drift) > SIZE_TOLERANCE:
        raise RuntimeError(f"{op}: floor body {size['floor']} B vs chatkit-pg {size['chatkit']} B")
    return {"rows": len(reference), "has_more": pages["chatkit"]["has_more"], "body_bytes": size}


def _side_summary(rs: list[LoadResult]) -> dict[str, Any]:
    return {
        "rps_median": round(statistics.median(x.rps for x in rs), 1),
        "p50_ms_median": round(statistics.median(x.p50_ms for x in rs), 2),
        "p99_ms_median": round(statistics.median(x.p99_ms for x in rs), 2),
        "server_cpu_us_per_request_median": round(
            statistics.median(x.server_cpu_us for x in rs), 1
        ),
        "db_cpu_us_per_request_median": round(statistics.median(x.db_cpu_us for x in rs), 1),
        "client_cpu_us_per_request_median": round(
            statistics.median(x.client_cpu_us for x in rs), 1
        ),
        "runs_rps": [round(x.rps, 1) for x in rs],
        "runs_p99_ms": [round(x.p99_ms, 2) for x in rs],
    }


def _ratios(runs: dict[str, list[LoadResult]], summary: dict[str, Any]) -> dict[str, Any]:
    """chatkit-pg over each baseline: req/s paired per round and of medians, p99, CPU."""
    c = summary["chatkit"]
    out = {}
    for base in BASELINES:
        b = summary[base]
        paired = [x.rps / y.rps for x, y in zip(runs["chatkit"], runs[base], strict=True)]
        out[base] = {
            "rps_paired_median": round(statistics.median(paired), 3),
            "rps_of_medians": round(c["rps_median"] / b["rps_median"], 3),
            "rps_paired_runs": [round(x, 3) for x in paired],
            "p99": round(c["p99_ms_median"] / b["p99_ms_median"], 3),
            # CPU per request, baseline over chatkit-pg (comparable with the req/s ratios, and
            # steadier on a loaded machine); with the PostgreSQL backends' CPU included too.
            "server_cpu_per_request": round(
                b["server_cpu_us_per_request_median"] / c["server_cpu_us_per_request_median"], 3
            ),
            "cpu_with_db_per_request": round(
                (b["server_cpu_us_per_request_median"] + b["db_cpu_us_per_request_median"])
                / (c["server_cpu_us_per_request_median"] + c["db_cpu_us_per_request_median"]),
                3,
            ),
        }
    return out


async def measure_op(op: str, sides: dict[str, Side], dsn: str) -> dict[str, Any]:
    for key, side in sides.items():
        if key != "bare":
            status, side.body = await fetch(side.server.port, side.request)
            if status != 200:
                raise RuntimeError(f"{op} on {side.server.name}: {status} {side.body[:300]!r}")
    # The bare route answers chatkit-pg's own bytes.
    name = op.replace(".", "_")
    status, _ = await fetch(
        sides["bare"].server.port,
        http_request("PUT", f"/bench/bare/{name}", sides["chatkit"].body),
    )
    assert status == 204
    status, sides["bare"].body = await fetch(sides["bare"].server.port, sides["bare"].request)
    assert status == 200 and sides["bare"].body == sides["chatkit"].body
    check = _page_check(op, {k: s.body for k, s in sides.items() if k != "bare"})
    for key in ("chatkit", "floor", "tutorial"):  # for a look at what each side answers
        (RESULTS_DIR / f"server-{op}-{key}.json").write_bytes(sides[key].body)

    for side in sides.values():
        await load(side.server.port, side.request, WARMUP_SECONDS, side.body)
    runs: dict[str, list[LoadResult]] = {k: [] for k in sides}
    for r in range(ROUNDS):
        for key in list(sides) if r % 2 == 0 else list(reversed(sides)):
            side = sides[key]
            db = await backend_pids(dsn, side.db_app) if side.db_app else []
            result = await load(
                side.server.port, side.request, LOAD_SECONDS, side.body, side.server, db
            )
            runs[key].append(result)
    summary: dict[str, Any] = {key: _side_summary(rs) for key, rs in runs.items()}
    summary |= check
    summary["ratios"] = _ratios(runs, summary)
    # The keys earlier runs wrote (chatkit-pg over the bare route), for comparison.
    bare = summary["ratios"]["bare"]
    summary["ratio_rps_paired_median"] = bare["rps_paired_median"]
    summary["ratio_rps"] = bare["rps_of_medians"]
    summary["ratio_server_cpu_per_request"] = bare["server_cpu_per_request"]
    summary["ratio_p99"] = bare["p99"]
    return summary


async def throughput(
    app: Server, floor: Server, tutorial: Server, token: str, thread_id: str, dsn: str
) -> dict[str, Any]:
    """Both list requests against all four sides; the data must have been seeded already."""
    requests = {
        "threads.list": chatkit("threads.list", {"limit": PAGE}, token),
        "items.list": chatkit("items.list", {"thread_id": thread_id, "limit": PAGE}, token),
    }
    out: dict[str, Any] = {}
    for op, request in requests.items():
        body = request.split(b"\r\n\r\n", 1)[1]  # the same request body, to a bare route
        bare = http_request("POST", f"/bench/bare/{op.replace('.', '_')}", body, token)
        sides = {
            "chatkit": Side(app, request, APP_NAME),
            "floor": Side(floor, request, FLOOR_APP_NAME),
            "tutorial": Side(tutorial, request, None),
            "bare": Side(app, bare, None),
        }
        out[op] = await measure_op(op, sides, dsn)
    return out


def verdict(reads: dict[str, Any]) -> dict[str, bool]:
    return {
        f"{op} vs {base}": r["ratios"][base]["rps_paired_median"] >= target
        for op, r in reads.items()
        for base, target in TARGETS.items()
    }


def report(reads: dict[str, Any]) -> None:
    print(
        f"  {'op':13} {'side':9} {'req/s':>8} {'p99 ms':>7} {'CPU us':>7} {'+PG us':>7} "
        f"{'cli us':>7} {'bytes':>6}   chatkit/side req/s: paired (of medians), p99; CPU "
        f"side/chatkit (+PG)"
    )
    for op, r in reads.items():
        for side in ("chatkit", *BASELINES):
            s = r[side]
            size = r["body_bytes"].get(side, r["body_bytes"]["chatkit"])
            line = (
                f"  {op:13} {side:9} {s['rps_median']:8.0f} {s['p99_ms_median']:7.2f} "
                f"{s['server_cpu_us_per_request_median']:7.0f} "
                f"{s['db_cpu_us_per_request_median']:7.0f} "
                f"{s['client_cpu_us_per_request_median']:7.0f} {size:6}"
            )
            if side != "chatkit":
                x = r["ratios"][side]
                target = f"  (target >= {TARGETS[side]})" if side in TARGETS else ""
                line += (
                    f"   {x['rps_paired_median']:5.2f} ({x['rps_of_medians']:5.2f}), "
                    f"p99 {x['p99']:5.2f}; CPU {x['server_cpu_per_request']:4.2f} "
                    f"({x['cpu_with_db_per_request']:4.2f}){target}"
                )
            print(line)
