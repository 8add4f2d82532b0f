"""Everything one user has stored, handed over (export) or removed (erase): docs/userdata.md.

Both reach every table: the chatkit_ tables (app.pg.userdata) and each plugin's, through its
``export_user`` and ``erase_user`` hooks (app.chat.plugins). ``python -m app users`` runs them as
the operator (app.cli.users); ``GET /me/export`` gives the signed-in user the same archive
(app.http.me).

* **Export** streams a ZIP (app.files.export): rows page by page, an attachment's bytes chunk
  by chunk, each piece handed on as soon as it is compressed, so memory stays bounded whatever
  the user holds. The pages are separate short reads, not one snapshot: what the user changes
  during an export may or may not be in it.
* **Erase** deletes in one transaction per group of tables (conversations; limits; each plugin),
  so a failure leaves each group whole or gone, never half a thread. It is idempotent: run
  again, it removes nothing more. ``dry_run`` runs the same deletes and rolls them back, so its
  counts are exactly what would go. Stop the user signing in first (at the identity provider):
  a request arriving during the erase can store new rows.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from app.chat.plugins import PluginSet, UserDatabase
from app.files.export import (
    FLUSH_BYTES,
    ZipStream,
    attachment_line,
    file_path,
    json_default,
    manifest,
    safe_part,
    write_lines,
)
from app.pg import userdata
from app.pg.calls import Call
from app.pg.pool import ConnectionPool


async def _counted(
    lines: AsyncGenerator[str, None], counts: dict[str, Any], key: str
) -> AsyncGenerator[str, None]:
    counts[key] = 0
    async with contextlib.aclosing(lines) as rows:
        async for line in rows:
            counts[key] += 1
            yield line


async def export_archive(
    pool: ConnectionPool,
    plugins: PluginSet,
    user_id: str,
    *,
    when: datetime | None = None,
    counts: dict[str, Any] | None = None,
) -> AsyncGenerator[bytes, None]:
    """The user's archive, piece by piece. A user with no rows gets an archive holding empty
    files and the manifest (counts all zero). ``counts``, if given, is filled with the
    manifest's counts as the archive is written."""
    when = when or datetime.now(UTC)
    archive = ZipStream(when)
    try:
        counts = {} if counts is None else counts
        sections = (
            ("threads.jsonl", "threads", userdata.thread_lines(pool, user_id)),
            ("items.jsonl", "items", userdata.item_lines(pool, user_id)),
            ("feedback.jsonl", "feedback", userdata.feedback_lines(pool, user_id)),
        )
        for name, key, lines in sections:
            async for piece in write_lines(archive, name, _counted(lines, counts, key)):
                yield piece
        async for piece in _attachments(archive, pool, user_id, counts):
            yield piece
        plugin_counts: dict[str, dict[str, int]] = {}
        for plugin in plugins.plugins:
            if plugin.export_user is None:
                continue
            tables = plugin_counts[plugin.name] = {}
            async for piece in _plugin(
                archive, plugin.name, plugin.export_user, pool, user_id, tables
            ):
                yield piece
        counts["plugins"] = plugin_counts
        body = manifest(archive, user_id, when, counts)  # every member but itself
        archive.open("manifest.json")
        archive.write(body)
        yield archive.close()
    except BaseException:
        archive.abandon()
        raise


async def _attachments(
    archive: ZipStream, pool: ConnectionPool, user_id: str, counts: dict[str, Any]
) -> AsyncIterator[bytes]:
    """``attachments.jsonl`` after each file's bytes: a member is written whole before the next
    starts, so the metadata lines wait (one short line per attachment) until the files are in."""
    lines: list[str] = []
    total = 0
    async for row in userdata.attachment_rows(pool, user_id):
        path = None
        if row["status"] == "ready":
            path = file_path(row["id"], row["name"])
            archive.open(path, compress=False)
            async for chunk in userdata.attachment_chunks(pool, user_id, row["id"]):
                archive.write(chunk)
                total += len(chunk)
                yield archive.drain()
            written = archive.members[path].size
            if written != (row["size_bytes"] or 0):
                raise RuntimeError(
                    f"attachment {row['id']} has {written} bytes stored, not {row['size_bytes']}"
                )
        lines.append(attachment_line(row, path))
    counts["attachments"] = len(lines)
    counts["attachment_bytes"] = total

    async def metadata() -> AsyncGenerator[str, None]:
        for line in lines:
            yield line

    async for piece in write_lines(archive, "attachments.jsonl", metadata()):
        yield piece


async def _plugin(
    archive: ZipStream,
    name: str,
    hook: Any,
    pool: ConnectionPool,
    user_id: str,
    tables: dict[str, int],
) -> AsyncIterator[bytes]:
    """A plugin's rows: every page of one table goes to ``plugins/<plugin>/<table>.jsonl``; a
    table's pages must come together (a member cannot be reopened)."""
    current: str | None = None
    async with contextlib.aclosing(hook(UserDatabase(pool, user_id))) as pages:
        async for table, rows in pages:
            if table != current:
                member = f"plugins/{safe_part(name, 'plugin')}/{safe_part(table, 'table')}.jsonl"
                archive.open(member)
                current = table
                tables.setdefault(table, 0)
            for row in rows:
                archive.write(json.dumps(row, default=json_default).encode() + b"\n")
                tables[table] += 1
            if archive.pending >= FLUSH_BYTES:
                yield archive.drain()
    archive.close_member()
    yield archive.drain()


def is_empty(counts: dict[str, Any]) -> bool:
    """Whether an export's counts say the user had nothing stored."""
    core = ("threads", "items", "feedback", "attachments")
    plugin_rows = sum(n for t in counts.get("plugins", {}).values() for n in t.values())
    return not any(counts.get(k) for k in core) and not plugin_rows


# --- erase -------------------------------------------------------------------------------------


@dataclass
class EraseReport:
    user_id: str
    dry_run: bool
    # group -> table -> rows; "attachment_bytes" counts bytes, not rows.
    groups: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(n for g in self.groups.values() for t, n in g.items() if t != "attachment_bytes")

    def lines(self) -> list[str]:
        verb = "would delete" if self.dry_run else "deleted"
        if self.rows == 0:
            return [f"no data stored for user {self.user_id!r}: nothing to delete"]
        out = [f"{verb} for user {self.user_id!r}:"]
        for group, tables in self.groups.items():
            for table, count in tables.items():
                unit = "bytes" if table == "attachment_bytes" else "rows"
                out.append(f"  {group}: {table} {count} {unit}")
        out.append(f"{verb} {self.rows} rows in all")
        return out


async def erase_user(
    pool: ConnectionPool, plugins: PluginSet, user_id: str, *, dry_run: bool = False
) -> EraseReport:
    """Delete every row of ``user_id``: the chatkit_ tables, then each plugin's (or, with
    ``dry_run``, count them by deleting and rolling back)."""
    report = EraseReport(user_id=user_id, dry_run=dry_run)
    for group in userdata.ERASE_GROUPS:
        report.groups[group] = await _in_transaction(
            pool, user_id, dry_run, lambda conn, g=group: userdata.erase_group(conn, user_id, g)
        )
    for plugin in plugins.plugins:
        if plugin.erase_user is None:
            continue
        hook = plugin.erase_user
        counts = await _in_transaction(
            pool, user_id, dry_run, lambda conn, h=hook: h(conn, user_id)
        )
        report.groups[f"plugin {plugin.name}"] = {str(k): int(v) for k, v in counts.items()}
    return report


async def _in_transaction(pool: ConnectionPool, user_id: str, dry_run: bool, work: Any) -> Any:
    async with Call(pool) as conn:
        await userdata.begin_as(conn, user_id)
        try:
            result = await work(conn)
        except BaseException:
            await _end(conn, "ROLLBACK")
            raise
        await _end(conn, "ROLLBACK" if dry_run else "COMMIT")
    return result


async def _end(conn: asyncpg.Connection, statement: str) -> None:
    try:
        await conn.execute(statement)
    except BaseException:
        conn.terminate()  # never handed back inside a transaction
        raise
