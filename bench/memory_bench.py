"""Memory benchmark: a server's RSS as large images pile up in a thread's history (issue 19).

A real uvicorn process serves the service (``app.main:create_app``) on loopback, answering
through an OpenAI-compatible model: the tests' fake Chat Completions server, on loopback in this
process, so every model request is built, serialised and sent as it would be to a provider.
The file settings are the defaults (``MAX_UPLOAD_BYTES`` 20 MiB, ``MODEL_INPUT_FILE_BYTES``
32 MiB, ``HISTORY_ITEMS`` 40). Three scenarios, each in a fresh server process, each ``TURNS``
messages in one thread:

* **new image each turn**: message n attaches a new 20 MiB image, naming it 10 times, so the
  history holds n large images (and 10n attachment entries);
* **same image**: every message names one 20 MiB image 10 times (issue 19's reproduction);
* **none**: the same messages without attachments (the baseline).

psutil samples the server's RSS every few milliseconds. **One turn's working set** is the peak
growth over idle during the first image turn. **Growth over N turns** is the peak over all N
turns minus idle, less the same for the baseline. The ratio growth / working set must stay
≤ 1.2: memory bounded by a constant, whatever N and however often a file is repeated. Before
issue 19 five turns of the reproduction took the server from 160 to 3,113 MB.

``python -m bench memory`` runs it; results go to ``bench/results/memory.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from typing import Any

import httpx
import psutil

from bench import RESULTS_DIR
from bench.attachments_bench import _auth, _Sampler, uvicorn_process
from tests.harness.fake_openai import FakeChatCompletions
from tests.harness.loopback import serve
from tests.harness.pg import describe, migrate, postgres_server

MiB = 1024 * 1024
TURNS = 6
IMAGE_BYTES = 20 * MiB
REPEAT = 10
TARGET = 1.2
SCENARIOS = ("none", "new_image", "same_image")


def _image() -> bytes:
    """A PNG as far as the content check goes (its signature), incompressible after it."""
    return b"\x89PNG\r\n\x1a\n" + os.urandom(IMAGE_BYTES - 8)


def _file_bytes(body: dict[str, Any]) -> int:
    """Bytes of base64 file data in a Chat Completions request."""
    total = 0
    for message in body.get("messages", []):
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "image_url":
                total += len(part["image_url"]["url"])
            elif part.get("type") == "file":
                total += len(part["file"].get("file_data", ""))
    return total


async def _send(
    client: httpx.AsyncClient, thread_id: str | None, text: str, attachments: list[str]
) -> str:
    params: dict[str, Any] = {
        "input": {
            "content": [{"type": "input_text", "text": text}],
            "attachments": attachments,
            "inference_options": {},
        }
    }
    if thread_id is None:
        body = {"type": "threads.create", "params": params}
    else:
        body = {"type": "threads.add_user_message", "params": {"thread_id": thread_id, **params}}
    r = await client.post("/chatkit", json=body, headers=_auth("bench"))
    r.raise_for_status()
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    if any(e.get("type") == "error" for e in events):
        raise RuntimeError(f"the reply failed: {r.text[:300]}")
    if thread_id is None:
        thread_id = next(e["thread"]["id"] for e in events if e.get("type") == "thread.created")
    return thread_id


async def _scenario(
    base: str, proc: psutil.Process, kind: str, fake: FakeChatCompletions
) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        ids: list[str] = []
        for n in range({"none": 0, "new_image": TURNS, "same_image": 1}[kind]):
            r = await client.post(
                "/files",
                files={"file": (f"photo{n}.png", _image(), "image/png")},
                headers=_auth("bench"),
            )
            r.raise_for_status()
            ids.append(r.json()["id"])
        # warm-up: imports, pooled connections, prepared statements
        await _send(client, None, "warm up", [])
        fake.requests.clear()
        await asyncio.sleep(0.5)
        idle = proc.memory_info().rss
        thread_id: str | None = None
        turns = []
        for n in range(TURNS):
            attach = [] if kind == "none" else [ids[n if kind == "new_image" else 0]] * REPEAT
            with _Sampler(proc) as sampler:
                started = time.perf_counter()
                thread_id = await _send(client, thread_id, f"turn {n}: what is in it?", attach)
                seconds = time.perf_counter() - started
            sent = sum(_file_bytes(b) for b in fake.streamed_requests)
            fake.requests.clear()
            turns.append(
                {
                    "peak_growth_mib": round((sampler.peak - idle) / MiB, 1),
                    "rss_after_growth_mib": round((proc.memory_info().rss - idle) / MiB, 1),
                    "model_request_file_mib": round(sent / MiB, 1),
                    "seconds": round(seconds, 2),
                }
            )
        await asyncio.sleep(1.0)
        retained = proc.memory_info().rss - idle
    return {
        "idle_rss_mib": round(idle / MiB, 1),
        "turns": turns,
        "first_turn_peak_growth_mib": turns[0]["peak_growth_mib"],
        "peak_growth_mib": max(t["peak_growth_mib"] for t in turns),
        "retained_growth_mib_1s_after": round(retained / MiB, 1),
    }


async def _all(url: str, data_dir: str) -> dict[str, Any]:
    fake = FakeChatCompletions()
    out: dict[str, Any] = {}
    async with serve(fake.app) as fake_base:
        env = {
            "OPENAI_BASE_URL": f"{fake_base}/v1",
            "MODEL_NAME": "fake",
            "THREAD_TITLES": "first_message",
            "MAX_UPLOAD_BYTES": str(IMAGE_BYTES),
        }
        for kind in SCENARIOS:
            with uvicorn_process(url, data_dir, env) as (base, proc):
                out[kind] = await _scenario(base, proc, kind, fake)
    return out


def run() -> dict[str, Any]:
    started = time.perf_counter()
    with postgres_server() as pg, tempfile.TemporaryDirectory(prefix="ckpg-mem-bench-") as tmp:
        url = asyncio.run(pg.create_database("ckpg_bench_mem"))
        try:
            migrate(url)
            scenarios = asyncio.run(_all(url, tmp))
        finally:
            asyncio.run(pg.drop_database(url))
        where = describe(pg)
    baseline = scenarios["none"]["peak_growth_mib"]
    for kind in ("new_image", "same_image"):
        s = scenarios[kind]
        working_set = s["first_turn_peak_growth_mib"]
        growth = s["peak_growth_mib"] - baseline
        s["ratio"] = round(growth / working_set, 2) if working_set > 0 else None
        s["meets_target"] = s["ratio"] is not None and s["ratio"] <= TARGET
    res: dict[str, Any] = {
        "turns": TURNS,
        "image_mib": IMAGE_BYTES / MiB,
        "repeat_per_message": REPEAT,
        "target_ratio": TARGET,
        "scenarios": scenarios,
        "meta": {
            "postgres": where,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "total_s": round(time.perf_counter() - started, 1),
        },
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "memory.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(
        f"\nmemory benchmark ({TURNS} turns in one thread, {IMAGE_BYTES // MiB} MiB images named "
        f"{REPEAT}x per message, real uvicorn + OpenAI-compatible fake model)"
    )
    print(f"  no images:          peak growth over {TURNS} turns {baseline} MiB")
    for kind, label in (("new_image", "new image each turn"), ("same_image", "same image")):
        s = scenarios[kind]
        print(
            f"  {label + ':':<20}one turn's working set {s['first_turn_peak_growth_mib']} MiB; "
            f"peak growth over {TURNS} turns {s['peak_growth_mib']} MiB "
            f"(per turn {[t['peak_growth_mib'] for t in s['turns']]}); "
            f"retained {s['retained_growth_mib_1s_after']} MiB; "
            f"file data per model request {[t['model_request_file_mib'] for t in s['turns']]} MiB "
            f"-> ratio {s['ratio']} (target <= {TARGET})"
        )
    print(f"  figures in {path} ({res['meta']['total_s']} s)")
    return res


if __name__ == "__main__":
    run()
    sys.exit(0)
