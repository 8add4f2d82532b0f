"""The tasks, in PostgreSQL, always scoped by the verified user.

The example keeps its table in a schema of its own (``mcp_tasks``), created at startup with
idempotent DDL under an advisory lock (several instances may start at once). That is enough for
an example; a real server would version its schema with migrations (Alembic, like chatkit-pg).
Every query filters on ``user_id``: another user's task answers exactly like a missing one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

SCHEMA_DDL = """
SELECT pg_advisory_xact_lock(hashtext('examples.mcp_tasks schema'));
CREATE SCHEMA IF NOT EXISTS mcp_tasks;
CREATE TABLE IF NOT EXISTS mcp_tasks.tasks (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id text NOT NULL,
    title text NOT NULL CHECK (length(title) BETWEEN 1 AND 500),
    done boolean NOT NULL DEFAULT false,
    thread_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz
);
CREATE INDEX IF NOT EXISTS tasks_user_id_idx ON mcp_tasks.tasks (user_id, id);
"""


def asyncpg_dsn(url: str) -> str:
    """asyncpg takes libpq URLs; accept SQLAlchemy's ``postgresql+asyncpg://`` spelling too."""
    for prefix in ("postgresql+asyncpg://", "postgres+asyncpg://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def _task(row: asyncpg.Record) -> dict[str, Any]:
    task = dict(row)
    for name in ("created_at", "completed_at"):
        value = task[name]
        task[name] = value.isoformat() if isinstance(value, datetime) else None
    return task


class TaskStore:
    def __init__(self, database_url: str) -> None:
        self.dsn = asyncpg_dsn(database_url)
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=5)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(SCHEMA_DDL)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the task store is not open")
        return self._pool

    async def add(self, user_id: str, title: str, thread_id: str | None) -> dict[str, Any]:
        row = await self.pool.fetchrow(
            "INSERT INTO mcp_tasks.tasks (user_id, title, thread_id) VALUES ($1, $2, $3) "
            "RETURNING id, title, done, thread_id, created_at, completed_at",
            user_id,
            title,
            thread_id,
        )
        return _task(row)

    async def tasks_of(self, user_id: str, *, include_done: bool) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT id, title, done, thread_id, created_at, completed_at FROM mcp_tasks.tasks "
            "WHERE user_id = $1 AND ($2 OR NOT done) ORDER BY id LIMIT 200",
            user_id,
            include_done,
        )
        return [_task(row) for row in rows]

    async def complete(self, user_id: str, task_id: int) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(
            "UPDATE mcp_tasks.tasks SET done = true, completed_at = coalesce(completed_at, now()) "
            "WHERE user_id = $1 AND id = $2 "
            "RETURNING id, title, done, thread_id, created_at, completed_at",
            user_id,
            task_id,
        )
        return None if row is None else _task(row)
