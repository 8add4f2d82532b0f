"""What nginx costs a ChatKit stream: the same app, streams read directly from uvicorn and
through the repository's nginx config (HTTPS, HTTP/2), in one run, interleaved.

    python -m bench.deploy_bench        (results: bench/results/deploy.json)

One uvicorn process (uvloop, httptools, the production factory) serves a paced model: each
reply is ``DELTAS`` text deltas ``INTERVAL_MS`` apart, and each delta carries the server's
``time.monotonic_ns()`` at emission (system-wide clock, so comparable across processes). Per
stream it records:

* time to first event: request sent → first complete SSE event (``thread.created``);
* delta latency: server emission → client has the event (what a proxy adds shows up here);
* inter-event gap: time between consecutive deltas as the client saw them, and its error
  against the gap the server produced.

Direct is plain HTTP/1.1 to uvicorn; via nginx is HTTPS with HTTP/2, one persistent
connection per client as a browser keeps it. Direct and nginx streams alternate so drift on
the machine hits both alike. Targets: first event via nginx within direct + 5 ms at p99;
gaps within 5 ms of direct.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import RESULTS_DIR
from tests.harness.deploy import (
    Backend,
    Nginx,
    StreamResult,
    bearer_token,
    find_nginx,
    pace_prompt,
    read_stream,
    threads_create_body,
)
from tests.harness.pg import describe, migrate, postgres_server

STREAMS = 100  # per path
WARMUP = 3
DELTAS = 20
INTERVAL_MS = 25
TARGET_MS = 5.0


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 3),
        "p90": round(percentile(ms, 90), 3),
        "p99": round(percentile(ms, 99), 3),
        "mean": round(statistics.fmean(ms), 3),
        "max": round(max(ms), 3),
    }


class PathStats:
    def __init__(self) -> None:
        self.first_event: list[float] = []
        self.first_delta: list[float] = []
        self.latency: list[float] = []
        self.gaps: list[float] = []
        self.gap_error: list[float] = []
        self.protocols: set[str] = set()

    def add(self, result: StreamResult) -> None:
        if result.status != 200 or result.body_error or len(result.deltas) != DELTAS:
            raise RuntimeError(f"bad stream: {result.status} {result.body_error}")
        self.protocols.add(result.http_version)
        self.first_event.append(result.events[0].arrived - result.started)
        deltas = result.deltas
        self.first_delta.append(deltas[0].arrived - result.started)
        self.latency += [d.arrived - (d.emitted or 0.0) for d in deltas]
        for previous, current in itertools.pairwise(deltas):
            client_gap = current.arrived - previous.arrived
            server_gap = (current.emitted or 0.0) - (previous.emitted or 0.0)
            self.gaps.append(client_gap)
            self.gap_error.append(abs(client_gap - server_gap))

    def report(self) -> dict[str, Any]:
        return {
            "http_versions": sorted(self.protocols),
            "time_to_first_event_ms": summary_ms(self.first_event),
            "time_to_first_delta_ms": summary_ms(self.first_delta),
            "delta_latency_ms": summary_ms(self.latency),
            "inter_event_gap_ms": summary_ms(self.gaps),
            "gap_error_vs_server_ms": summary_ms(self.gap_error),
        }


async def measure(backend: Backend, nginx: Nginx) -> dict[str, PathStats]:
    prompt = pace_prompt(DELTAS, INTERVAL_MS)
    body = threads_create_body(prompt)
    stats = {"direct": PathStats(), "nginx": PathStats()}
    timeout = httpx.Timeout(60, connect=5)
    async with (
        httpx.AsyncClient(timeout=timeout) as direct,
        httpx.AsyncClient(verify=False, http2=True, timeout=timeout) as proxied,
    ):
        clients = {"direct": (direct, backend.url), "nginx": (proxied, nginx.https_url)}
        for round_no in range(WARMUP + STREAMS):
            # Alternate which path goes first, so neither always follows the other.
            order = ["direct", "nginx"] if round_no % 2 == 0 else ["nginx", "direct"]
            for path in order:
                http, base = clients[path]
                result = await read_stream(http, f"{base}/chatkit", body, bearer_token())
                if round_no >= WARMUP:
                    stats[path].add(result)
    return stats


def paired_differences(stats: dict[str, PathStats]) -> list[float]:
    """nginx minus direct time to first event, per round (the two streams ran back to back,
    so load on the machine that hits one mostly hits the other too)."""
    return [
        n - d for n, d in zip(stats["nginx"].first_event, stats["direct"].first_event, strict=True)
    ]


def nginx_version(binary: str) -> str:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (result.stderr or result.stdout).strip()


async def bench() -> dict[str, Any]:
    binary = find_nginx()
    if not binary:
        raise SystemExit("nginx is not installed: apt-get install nginx")
    with postgres_server() as server, tempfile.TemporaryDirectory(prefix="ckpg-deploy-") as tmp:
        url = await server.create_database("ckpg_bench")
        try:
            await asyncio.to_thread(migrate, url)
            backend = Backend(database_url=url)
            backend.start(Path(tmp) / "uvicorn.log")
            nginx = Nginx(prefix=Path(tmp) / "nginx", upstream=f"127.0.0.1:{backend.port}")
            try:
                nginx.start()
                started = time.monotonic()
                stats = await measure(backend, nginx)
                seconds = time.monotonic() - started
            finally:
                nginx.stop()
                backend.stop()
        finally:
            await server.drop_database(url)
        database = describe(server)

    direct, proxied = stats["direct"].report(), stats["nginx"].report()
    ttfe_d, ttfe_n = direct["time_to_first_event_ms"], proxied["time_to_first_event_ms"]
    gap_d, gap_n = direct["inter_event_gap_ms"], proxied["inter_event_gap_ms"]
    lat_d, lat_n = direct["delta_latency_ms"], proxied["delta_latency_ms"]
    paired = summary_ms(paired_differences(stats))
    comparison = {
        "first_event_p99_added_ms": round(ttfe_n["p99"] - ttfe_d["p99"], 3),
        "first_event_p50_added_ms": round(ttfe_n["p50"] - ttfe_d["p50"], 3),
        "first_event_paired_difference_p50_ms": paired["p50"],
        "first_event_paired_difference_p90_ms": paired["p90"],
        "delta_latency_p50_added_ms": round(lat_n["p50"] - lat_d["p50"], 3),
        "delta_latency_p99_added_ms": round(lat_n["p99"] - lat_d["p99"], 3),
        "gap_p50_difference_ms": round(gap_n["p50"] - gap_d["p50"], 3),
        "gap_p99_difference_ms": round(gap_n["p99"] - gap_d["p99"], 3),
    }
    targets = {
        "first_event_p99_within_direct_plus_5ms": comparison["first_event_p99_added_ms"]
        <= TARGET_MS,
        "gaps_within_5ms_of_direct": abs(comparison["gap_p50_difference_ms"]) <= TARGET_MS
        and abs(comparison["gap_p99_difference_ms"]) <= TARGET_MS,
    }
    return {
        "benchmark": "deploy",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "nginx": nginx_version(binary),
            "database": database,
        },
        "setup": {
            "streams_per_path": STREAMS,
            "warmup_per_path": WARMUP,
            "deltas_per_stream": DELTAS,
            "interval_ms": INTERVAL_MS,
            "direct": "HTTP/1.1 to uvicorn (uvloop, httptools), keep-alive",
            "nginx": "HTTPS + HTTP/2 to nginx (repository templates), keep-alive upstream",
            "seconds": round(seconds, 1),
        },
        "direct": direct,
        "nginx": proxied,
        "comparison": comparison,
        "targets_met": targets,
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"\n[bench] deploy: {report['machine']['nginx']}, {report['setup']['seconds']} s")
    rows = [
        ("time to first event", "time_to_first_event_ms"),
        ("time to first delta", "time_to_first_delta_ms"),
        ("delta latency", "delta_latency_ms"),
        ("inter-event gap", "inter_event_gap_ms"),
        ("gap error vs server", "gap_error_vs_server_ms"),
    ]
    print(f"{'ms':<22}{'direct p50':>12}{'p99':>9}{'nginx p50':>12}{'p99':>9}")
    for label, key in rows:
        d, n = report["direct"][key], report["nginx"][key]
        print(f"{label:<22}{d['p50']:>12.2f}{d['p99']:>9.2f}{n['p50']:>12.2f}{n['p99']:>9.2f}")
    for key, value in report["comparison"].items():
        print(f"  {key}: {value:+.2f}")
    for key, met in report["targets_met"].items():
        print(f"  target {key}: {'met' if met else 'MISSED'}")


def run() -> dict[str, Any]:
    report = asyncio.run(bench())
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "deploy.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"  written to {RESULTS_DIR / 'deploy.json'}")
    return report


if __name__ == "__main__":
    run()
