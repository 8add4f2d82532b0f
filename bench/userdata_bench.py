"""User export benchmark: ``python -m app users export`` of a large user, time and peak memory.

A fresh migrated database on the tests' PostgreSQL holds three users, written in bulk by SQL:

* ``big``: 100 threads of 100 items (10,000 items, about 400 bytes of JSON each) and 100
  attachments of 1 MiB (100 MiB of bytes, in the store's 256 KiB chunks);
* ``tenth``: the same 10,000 items and 10 attachments (10 MiB);
* ``nobody``: nothing (the archive holds only empty files and the manifest).

Each export runs as the operator runs it, a real ``python -m app users export`` process writing
to a file; its peak resident memory is the kernel's own figure for that child (``wait4``'s
``ru_maxrss``), so nothing between samples is missed. We quote each peak minus the empty
export's peak (the interpreter and libraries): what the data costs. The time is the export
itself, run in this process to a file (median of the rounds), since a command's start-up
(imports) is the same whatever the user holds; the command's whole time is recorded too. Bounded memory means the 100 MiB export costs about what the 10 MiB one
does, a small constant plus about one 256 KiB chunk, not the size of the data.

``python -m bench.userdata_bench`` (or ``python -m bench userdata``); results go to
``bench/results/userdata.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import asyncpg

from app.files.store import CHUNK_SIZE
from app.settings import PROJECT_ROOT
from bench import RESULTS_DIR
from tests.harness.pg import PgServer, describe, migrate, postgres_server

MiB = 1024 * 1024
ROUNDS = 3  # in-process exports, timed
PROCESS_ROUNDS = 1  # command runs, for the peak memory (the kernel's figure is exact)
USERS = {"big": 100, "tenth": 10, "nobody": 0}  # user -> attachments of 1 MiB
THREADS, ITEMS_PER_THREAD = 100, 100

SEED_ITEMS = """
INSERT INTO chatkit_threads (user_id, id, created_at, title, data)
SELECT $1, 'thr_' || t, now() - make_interval(hours => 1000 - t), 'Thread ' || t,
       jsonb_build_object('id', 'thr_' || t, 'title', 'Thread ' || t)
FROM generate_series(1, $2) t;
"""
SEED_ITEM_ROWS = """
INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data)
SELECT $1, 'thr_' || t, 'msg_' || t || '_' || i,
       now() - make_interval(hours => 1000 - t) + make_interval(secs => i), 'user_message',
       jsonb_build_object('id', 'msg_' || t || '_' || i, 'type', 'user_message',
                          'content', jsonb_build_array(jsonb_build_object(
                              'type', 'input_text', 'text', repeat('lorem ipsum ', 25))))
FROM generate_series(1, $2) t, generate_series(1, $3) i;
"""
SEED_FILES = """
INSERT INTO chatkit_attachments (user_id, id, thread_id, data, status, size_bytes, mime_type)
SELECT $1, 'atc_' || a, NULL, jsonb_build_object('id', 'atc_' || a, 'type', 'file',
       'name', 'file ' || a || '.bin', 'mime_type', 'application/octet-stream'),
       'ready', $3::bigint * $4, 'application/octet-stream'
FROM generate_series(1, $2) a;
"""
# Chunks of CHUNK_SIZE bytes: an md5 digest (16 bytes) repeated.
SEED_CHUNKS = """
INSERT INTO chatkit_attachment_blobs (user_id, attachment_id, chunk_no, data)
SELECT $1, 'atc_' || a, c, decode(repeat(md5(a || ':' || c), $5 / 16), 'hex')
FROM generate_series(1, $2) a, generate_series(0, $3 - 1) c
WHERE $4 > 0;
"""


async def seed(url: str) -> None:
    conn = await asyncpg.connect(PgServer.dsn(url))
    try:
        per_file = MiB // CHUNK_SIZE
        for user, files in USERS.items():
            if user == "nobody":
                continue
            await conn.execute(SEED_ITEMS, user, THREADS)
            await conn.execute(SEED_ITEM_ROWS, user, THREADS, ITEMS_PER_THREAD)
            await conn.execute(SEED_FILES, user, files, per_file, CHUNK_SIZE)
            await conn.execute(SEED_CHUNKS, user, files, per_file, files, CHUNK_SIZE)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def export_once(url: str, user: str, out: Path) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one ``users export`` process."""
    out.unlink(missing_ok=True)
    env = {**os.environ, "DATABASE_URL": url, "CHATKIT_PLUGINS": ""}
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "users", "export", "--sub", user, "--out", str(out)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.stderr is not None
    err = process.stderr.read().decode()
    if process.returncode != 0:
        raise RuntimeError(f"export of {user} failed: {err}")
    return elapsed, usage.ru_maxrss * 1024


async def export_in_process(url: str, user: str, out: Path) -> float:
    """Seconds of the export itself (what the command does after its imports), to a file."""
    from app.chat.plugins import PluginSet
    from app.chat.userdata import export_archive
    from app.pg.pool import open_pool
    from app.settings import Settings

    pool = await open_pool(url, Settings(database_url=url))
    try:
        start = time.perf_counter()
        with out.open("wb") as f:
            async for piece in export_archive(pool, PluginSet(), user):
                f.write(piece)
        return time.perf_counter() - start
    finally:
        await pool.close()


def run() -> None:
    with postgres_server() as server:
        url = asyncio.run(server.create_database("ckpg_bench_userdata"))
        try:
            migrate(url)
            asyncio.run(seed(url))
            results: dict[str, Any] = {"server": describe(server), "users": {}}
            with tempfile.TemporaryDirectory() as tmp:
                for user, files in USERS.items():
                    out = Path(tmp) / f"{user}.zip"
                    runs = [export_once(url, user, out) for _ in range(PROCESS_ROUNDS)]
                    timed = [asyncio.run(export_in_process(url, user, out)) for _ in range(ROUNDS)]
                    with zipfile.ZipFile(out) as archive:
                        counts = json.loads(archive.read("manifest.json"))["counts"]
                    results["users"][user] = {
                        "attachment_mib": files,
                        "items": counts["items"],
                        "archive_bytes": out.stat().st_size,
                        "process_seconds_median": statistics.median(r[0] for r in runs),
                        "export_seconds_median": statistics.median(timed),
                        "peak_rss_mib_median": statistics.median(r[1] for r in runs) / MiB,
                    }
            base = results["users"]["nobody"]
            for user in ("big", "tenth"):
                row = results["users"][user]
                row["peak_rss_over_empty_mib"] = (
                    row["peak_rss_mib_median"] - base["peak_rss_mib_median"]
                )
                row["mib_per_second"] = row["archive_bytes"] / MiB / row["export_seconds_median"]
            big, tenth = results["users"]["big"], results["users"]["tenth"]
            results["rss_growth_100mib_vs_10mib_mib"] = (
                big["peak_rss_mib_median"] - tenth["peak_rss_mib_median"]
            )
            results["chunk_mib"] = CHUNK_SIZE / MiB
        finally:
            asyncio.run(server.drop_database(url))
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "userdata.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    run()
