"""One user's rows in the chatkit_ tables, read page by page and erased table by table.

The reads back ``users export`` and ``GET /me/export`` (app.chat.userdata): each is a keyset
page on an index that leads with ``user_id`` (threads by creation, a thread's items in order,
feedback and attachments by key, an attachment's bytes one chunk per query), written as a gated
select (app.pg.sql), so it works through the app's role under row-level security, as the
owner, and on a Citus cluster (filtered by ``user_id = $1``: one shard). Each page borrows a
pooled connection for one statement only, so a slow reader (an HTTP client) holds none, and
memory is one page whatever the user's size.

The erase backs ``users erase``: ``DELETE ... WHERE user_id = $1`` on each table, children first
so that every row is counted (``ON DELETE CASCADE`` would remove them unseen), in one
transaction per group of tables that belong together (``ERASE_GROUPS``). The caller opens the
transaction (with the user set for row-level security and, on Citus, for the workers) and
commits it, or rolls it back for a dry run: the counts of a dry run are exactly what a real run
would remove at that moment.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from datetime import datetime

import asyncpg

from app.pg.calls import Call
from app.pg.citus import CITUS_BEGIN, CITUS_INSTALLED, literal
from app.pg.pool import ConnectionPool
from app.pg.sql import gated_select

PAGE_ROWS = 200
"""Rows per page read. Items are JSON of bounded size (MAX_BODY_BYTES), so a page is too."""

NEVER = datetime.fromisoformat("0001-01-01T00:00:00+00:00")
"""Before every row: the first page's cursor."""

# Each line is built by PostgreSQL as JSON text: the stored JSONB goes out as it is, never
# parsed and dumped again in Python. Literal SQL; values are always bound.
SQL_THREADS = gated_select(
    "q.line, q.created_at, q.seq",
    "SELECT json_build_object('id', id, 'created_at', created_at, 'updated_at', updated_at, "
    "'title', title, 'data', data)::text AS line, id, created_at, seq FROM chatkit_threads "
    "WHERE user_id = $1 AND (created_at, seq) > ($2::timestamptz, $3::bigint) "
    "ORDER BY created_at, seq LIMIT $4",
    "q.created_at, q.seq",
)
SQL_ITEMS = gated_select(
    "q.line, q.created_at, q.seq",
    "SELECT json_build_object('thread_id', thread_id, 'id', id, 'created_at', created_at, "
    "'type', type, 'data', data)::text AS line, created_at, seq FROM chatkit_items "
    "WHERE user_id = $1 AND thread_id = $2 AND (created_at, seq) > ($3::timestamptz, $4::bigint) "
    "ORDER BY created_at, seq LIMIT $5",
    "q.created_at, q.seq",
)
SQL_THREAD_IDS = gated_select(
    "q.id, q.created_at, q.seq",
    "SELECT id, created_at, seq FROM chatkit_threads "
    "WHERE user_id = $1 AND (created_at, seq) > ($2::timestamptz, $3::bigint) "
    "ORDER BY created_at, seq LIMIT $4",
    "q.created_at, q.seq",
)
SQL_FEEDBACK = gated_select(
    "q.line, q.thread_id, q.item_id",
    "SELECT json_build_object('thread_id', thread_id, 'item_id', item_id, 'kind', kind, "
    "'created_at', created_at)::text AS line, thread_id, item_id FROM chatkit_feedback "
    "WHERE user_id = $1 AND (thread_id, item_id) > ($2::text, $3::text) "
    "ORDER BY thread_id, item_id LIMIT $4",
    "q.thread_id, q.item_id",
)
SQL_ATTACHMENTS = gated_select(
    "q.id, q.thread_id, q.status, q.size_bytes, q.mime_type, q.name, q.created_at, q.data",
    "SELECT id, thread_id, status, size_bytes, mime_type, data->>'name' AS name, created_at, "
    "data::text AS data FROM chatkit_attachments WHERE user_id = $1 AND id > $2::text "
    "ORDER BY id LIMIT $3",
    "q.id",
)
SQL_CHUNK = gated_select(
    "q.data",
    "SELECT data FROM chatkit_attachment_blobs "
    "WHERE user_id = $1 AND attachment_id = $2 AND chunk_no = $3",
)

ERASE_GROUPS: dict[str, tuple[str, ...]] = {
    # Children before parents: every row is counted by its own DELETE.
    "conversations": (
        "chatkit_feedback",
        "chatkit_attachment_blobs",
        "chatkit_attachments",
        "chatkit_items",
        "chatkit_threads",
    ),
    # On a Citus cluster these stay on the coordinator (app.cli.distribute).
    "limits": ("chatkit_rate_limits", "chatkit_stream_leases"),
    # Resumable replies' logs (app.pg.runlog); on a Citus cluster on the coordinator too.
    "runs": ("chatkit_run_events", "chatkit_runs"),
}
"""Each group is erased in one transaction of its own. Table names are constants."""
SQL_ERASE = {t: f"DELETE FROM {t} WHERE user_id = $1" for g in ERASE_GROUPS.values() for t in g}  # noqa: S608
SQL_ATTACHMENT_BYTES = (
    "SELECT coalesce(sum(size_bytes), 0)::bigint FROM chatkit_attachments WHERE user_id = $1"
)


async def thread_lines(pool: ConnectionPool, user_id: str) -> AsyncGenerator[str, None]:
    """The user's threads as JSON lines, oldest first."""
    after: tuple[datetime, int] = (NEVER, -1)
    while True:
        async with Call(pool) as conn:
            rows = await conn.fetch(SQL_THREADS, user_id, *after, PAGE_ROWS)
        for line, *_ in rows:
            yield line
        if len(rows) < PAGE_ROWS:
            return
        after = (rows[-1][1], rows[-1][2])


async def item_lines(pool: ConnectionPool, user_id: str) -> AsyncGenerator[str, None]:
    """Every item of the user's threads as JSON lines: thread by thread (oldest first), each
    thread's items in their order."""
    after: tuple[datetime, int] = (NEVER, -1)
    while True:
        async with Call(pool) as conn:
            threads = await conn.fetch(SQL_THREAD_IDS, user_id, *after, PAGE_ROWS)
        for thread_id, *_ in threads:
            cursor: tuple[datetime, int] = (NEVER, -1)
            while True:
                async with Call(pool) as conn:
                    rows = await conn.fetch(SQL_ITEMS, user_id, thread_id, *cursor, PAGE_ROWS)
                for line, *_ in rows:
                    yield line
                if len(rows) < PAGE_ROWS:
                    break
                cursor = (rows[-1][1], rows[-1][2])
        if len(threads) < PAGE_ROWS:
            return
        after = (threads[-1][1], threads[-1][2])


async def feedback_lines(pool: ConnectionPool, user_id: str) -> AsyncGenerator[str, None]:
    after = ("", "")
    while True:
        async with Call(pool) as conn:
            rows = await conn.fetch(SQL_FEEDBACK, user_id, *after, PAGE_ROWS)
        for line, *_ in rows:
            yield line
        if len(rows) < PAGE_ROWS:
            return
        after = (rows[-1][1], rows[-1][2])


async def attachment_rows(pool: ConnectionPool, user_id: str) -> AsyncIterator[asyncpg.Record]:
    """The user's attachments' metadata (id, thread_id, status, size_bytes, mime_type, name,
    created_at, data as JSON text), by id."""
    after = ""
    while True:
        async with Call(pool) as conn:
            rows = await conn.fetch(SQL_ATTACHMENTS, user_id, after, PAGE_ROWS)
        for row in rows:
            yield row
        if len(rows) < PAGE_ROWS:
            return
        after = rows[-1][0]


async def attachment_chunks(
    pool: ConnectionPool, user_id: str, attachment_id: str
) -> AsyncIterator[bytes]:
    """An attachment's bytes, one stored chunk per query: memory is one chunk."""
    chunk_no = 0
    while True:
        async with Call(pool) as conn:
            data = await conn.fetchval(SQL_CHUNK, user_id, attachment_id, chunk_no)
        if data is None:
            return
        yield data
        chunk_no += 1


# --- erase -----------------------------------------------------------------------------------


async def begin_as(conn: asyncpg.Connection, user_id: str) -> None:
    """Open a transaction acting for ``user_id``: row-level security shows its rows whichever
    role runs it, and on a Citus cluster the workers get the setting too (app.pg.citus)."""
    if await conn.fetchval(CITUS_INSTALLED):
        await conn.execute(f"{CITUS_BEGIN}{literal(user_id)}")
    else:
        await conn.execute("BEGIN")
        await conn.execute("SELECT set_config('app.user_id', $1, true)", user_id)


def deleted(status: str) -> int:
    """The row count of a ``DELETE n`` status."""
    return int(status.rsplit(" ", 1)[-1])


async def erase_group(conn: asyncpg.Connection, user_id: str, group: str) -> dict[str, int]:
    """Delete the user's rows in one group's tables, inside the caller's transaction."""
    counts: dict[str, int] = {}
    if group == "conversations":
        counts["attachment_bytes"] = int(await conn.fetchval(SQL_ATTACHMENT_BYTES, user_id))
    for table in ERASE_GROUPS[group]:
        counts[table] = deleted(await conn.execute(SQL_ERASE[table], user_id))
    return counts
