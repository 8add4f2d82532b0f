"""A user's data in every table, written as the owner in plain SQL, and the archive read back:
shared by the export and erase tests (pg, cli, http, citus)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from app.files.store import CHUNK_SIZE

TASKS_TABLE_EXISTS = "SELECT to_regclass('plugin_tasks') IS NOT NULL"


@dataclass
class Seeded:
    user_id: str
    threads: list[str] = field(default_factory=list)
    items: dict[str, list[str]] = field(default_factory=dict)  # thread -> item ids in order
    feedback: int = 0
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # id -> (name, bytes)
    pending: list[str] = field(default_factory=list)  # attachments without bytes
    tasks: list[str] = field(default_factory=list)

    @property
    def item_count(self) -> int:
        return sum(len(v) for v in self.items.values())

    @property
    def attachment_count(self) -> int:
        return len(self.files) + len(self.pending)


def file_bytes(user_id: str, n: int, size: int) -> bytes:
    """Deterministic, incompressible-looking bytes of ``size``."""
    seed = hashlib.sha256(f"{user_id}:{n}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


async def seed_user(
    conn: asyncpg.Connection,
    user_id: str,
    *,
    threads: int = 3,
    items_per_thread: int = 5,
    file_sizes: tuple[int, ...] = (10, CHUNK_SIZE * 2 + 7),
    names: tuple[str, ...] = (),
    ids: tuple[str, ...] = (),
    tasks: tuple[str, ...] = ("buy milk", "call mum"),
) -> Seeded:
    """``user_id``'s threads (items in order, feedback on the first item of each), attachments
    (ready ones with bytes in chunks, one pending, one never attached), a rate-limit row, a
    stream lease and, when the plugin's table exists, tasks. ``conn`` must bypass row-level
    security (the owner) or be on a Citus cluster's coordinator as the owner."""
    out = Seeded(user_id)
    for t in range(threads):
        thread_id = f"thr_{user_id}_{t}"
        await conn.execute(
            "INSERT INTO chatkit_threads (user_id, id, created_at, title, data) VALUES "
            "($1, $2, now() - make_interval(days => $3), $4, $5::jsonb)",
            user_id,
            thread_id,
            threads - t,
            f"Thread {t}",
            json.dumps({"id": thread_id, "title": f"Thread {t}", "status": {"type": "active"}}),
        )
        out.threads.append(thread_id)
        ids = [f"msg_{user_id}_{t}_{i:05d}" for i in range(items_per_thread)]
        await conn.executemany(
            "INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data) VALUES "
            "($1, $2, $3, now() - make_interval(days => $4) + make_interval(secs => $5), "
            "'user_message', $6::jsonb)",
            [
                (
                    user_id,
                    thread_id,
                    item_id,
                    threads - t,
                    i,
                    json.dumps({"id": item_id, "type": "user_message", "text": f"hello {i}"}),
                )
                for i, item_id in enumerate(ids)
            ],
        )
        out.items[thread_id] = ids
        if ids:
            await conn.execute(
                "INSERT INTO chatkit_feedback (user_id, thread_id, item_id, kind) "
                "VALUES ($1, $2, $3, 'positive')",
                user_id,
                thread_id,
                ids[0],
            )
            out.feedback += 1
    for n, size in enumerate(file_sizes):
        attachment_id = ids[n] if n < len(ids) else f"atc_{user_id}_{n}"
        name = names[n] if n < len(names) else f"file {n}.bin"
        data = file_bytes(user_id, n, size)
        thread = out.threads[n % len(out.threads)] if out.threads and n % 2 == 0 else None
        await _attachment(conn, user_id, attachment_id, thread, name, "ready", size)
        await conn.executemany(
            "INSERT INTO chatkit_attachment_blobs (user_id, attachment_id, chunk_no, data) "
            "VALUES ($1, $2, $3, $4)",
            [
                (user_id, attachment_id, i // CHUNK_SIZE, data[i : i + CHUNK_SIZE])
                for i in range(0, size, CHUNK_SIZE)
            ],
        )
        out.files[attachment_id] = (name, data)
    pending = f"atc_{user_id}_pending"
    await _attachment(conn, user_id, pending, None, "half.txt", "pending", None)
    out.pending.append(pending)
    await conn.execute("INSERT INTO chatkit_rate_limits (user_id, tat) VALUES ($1, now())", user_id)
    await conn.execute(
        "INSERT INTO chatkit_stream_leases (user_id, id, thread_id, expires_at) "
        "VALUES ($1, $2, NULL, now() + interval '1 minute')",
        user_id,
        f"lease_{user_id}",
    )
    # A resumable reply's log (app.pg.runlog): the run and two of its events.
    await conn.execute(
        "INSERT INTO chatkit_runs (user_id, id, last_seq) VALUES ($1, $2, 2)",
        user_id,
        f"run_{user_id}",
    )
    await conn.executemany(
        "INSERT INTO chatkit_run_events (user_id, run_id, seq, data) VALUES ($1, $2, $3, 'data: {}')",
        [(user_id, f"run_{user_id}", seq) for seq in (1, 2)],
    )
    if tasks and await conn.fetchval(TASKS_TABLE_EXISTS):
        for title in tasks:
            await conn.execute(
                "INSERT INTO plugin_tasks (user_id, title) VALUES ($1, $2)", user_id, title
            )
        out.tasks = list(tasks)
    return out


async def _attachment(
    conn: asyncpg.Connection,
    user_id: str,
    attachment_id: str,
    thread_id: str | None,
    name: str,
    status: str,
    size: int | None,
) -> None:
    data = {"id": attachment_id, "type": "file", "name": name, "mime_type": "text/plain"}
    await conn.execute(
        "INSERT INTO chatkit_attachments (user_id, id, thread_id, data, status, size_bytes, "
        "mime_type) VALUES ($1, $2, $3, $4::jsonb, $5, $6, 'text/plain')",
        user_id,
        attachment_id,
        thread_id,
        json.dumps(data),
        status,
        size,
    )


USER_TABLES = (
    "chatkit_threads",
    "chatkit_items",
    "chatkit_feedback",
    "chatkit_attachments",
    "chatkit_attachment_blobs",
    "chatkit_rate_limits",
    "chatkit_stream_leases",
    "chatkit_runs",
    "chatkit_run_events",
)


async def row_counts(conn: asyncpg.Connection, user_id: str) -> dict[str, int]:
    """The user's rows in each table (plugin_tasks too when it exists), counted as the owner."""
    tables = list(USER_TABLES)
    if await conn.fetchval(TASKS_TABLE_EXISTS):
        tables.append("plugin_tasks")
    return {
        t: await conn.fetchval(f"SELECT count(*) FROM {t} WHERE user_id = $1", user_id)
        for t in tables
    }


@dataclass
class Archive:
    """An export read back, every member's digest checked against the manifest."""

    zip: zipfile.ZipFile
    manifest: dict[str, Any]

    def lines(self, name: str) -> list[dict[str, Any]]:
        text = self.zip.read(name).decode()
        return [json.loads(line) for line in text.splitlines()]

    @property
    def counts(self) -> dict[str, Any]:
        return dict(self.manifest["counts"])


def read_archive(data: bytes) -> Archive:
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None
    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["format"] == "chatkit-pg.user-export" and manifest["version"] == 1
    names = set(archive.namelist())
    assert set(manifest["files"]) == names - {"manifest.json"}
    for name, digest in manifest["files"].items():
        body = archive.read(name)
        assert len(body) == digest["size"], name
        assert hashlib.sha256(body).hexdigest() == digest["sha256"], name
    return Archive(archive, manifest)


def assert_matches(archive: Archive, seeded: Seeded) -> None:
    """The archive holds exactly what ``seed_user`` wrote: threads in order, each thread's items
    in order, feedback, the bytes of ready files under their names, and the tasks."""
    assert archive.manifest["user_id"] == seeded.user_id
    assert [t["id"] for t in archive.lines("threads.jsonl")] == seeded.threads
    items = archive.lines("items.jsonl")
    assert [(i["thread_id"], i["id"]) for i in items] == [
        (t, i) for t in seeded.threads for i in seeded.items[t]
    ]
    assert all(i["data"]["id"] == i["id"] for i in items)
    assert len(archive.lines("feedback.jsonl")) == seeded.feedback
    metadata = {a["id"]: a for a in archive.lines("attachments.jsonl")}
    assert set(metadata) == set(seeded.files) | set(seeded.pending)
    for attachment_id, (_name, data) in seeded.files.items():
        path = metadata[attachment_id]["file"]
        assert path is not None and path.startswith("files/")
        assert archive.zip.read(path) == data
    assert all(metadata[p]["file"] is None for p in seeded.pending)
    counts = archive.counts
    assert counts["threads"] == len(seeded.threads)
    assert counts["items"] == seeded.item_count
    assert counts["feedback"] == seeded.feedback
    assert counts["attachments"] == seeded.attachment_count
    assert counts["attachment_bytes"] == sum(len(d) for _, d in seeded.files.values())
    if seeded.tasks:
        tasks = archive.lines("plugins/tasks/plugin_tasks.jsonl")
        assert sorted(t["title"] for t in tasks) == sorted(seeded.tasks)
        assert counts["plugins"] == {"tasks": {"plugin_tasks": len(seeded.tasks)}}


def assert_empty(archive: Archive, user_id: str) -> None:
    """An export of a user with nothing stored: empty members and zero counts."""
    assert archive.manifest["user_id"] == user_id
    for name in ("threads.jsonl", "items.jsonl", "feedback.jsonl", "attachments.jsonl"):
        assert archive.zip.read(name) == b""
    assert not [n for n in archive.zip.namelist() if n.startswith(("files/", "plugins/"))]
    counts = archive.counts
    assert counts["threads"] == counts["items"] == counts["feedback"] == 0
    assert counts["attachments"] == counts["attachment_bytes"] == 0


TASKS_PLUGIN = "examples.plugin_tasks.plugin:plugin"


async def migrated_with_tasks(pg_server: Any, prefix: str) -> str:
    """A new database migrated by the app's migrate path with the task plugin's branch."""
    import asyncio

    from alembic import command

    from app.chat.plugins import load_plugins
    from app.cli.commands import alembic_config

    url: str = await pg_server.create_database(prefix)
    cfg = alembic_config(url, load_plugins([TASKS_PLUGIN]).migration_locations, quiet=True)
    await asyncio.to_thread(command.upgrade, cfg, "heads")
    return url
