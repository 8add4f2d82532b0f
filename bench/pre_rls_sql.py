"""The store's SQL as it was before row-level security (app/pg/store.py at commit d18fa69).

The store benchmark's ``pre`` side runs today's ``PostgresStore`` code with these statements
swapped in, as the tables' owner: the store exactly as it was deployed before the second wall.
Same names as app.pg.store's module constants; the positional parameters are the same too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import app.pg.store as store_module
from app.pg.sql import _PageSQL


def _page_sql(table: str, scope: str, nscope: int, order: Literal["asc", "desc"]) -> _PageSQL:
    cmp, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
    cursor = f"${nscope + 1}"
    limit = f"${nscope + 2}"
    cols = scope.split(",")
    where = " AND ".join(f"{c} = ${i + 1}" for i, c in enumerate(cols))
    order_by = f"created_at {direction}, seq {direction}"
    return _PageSQL(
        first=f"SELECT id, data::text FROM {table} WHERE {where} ORDER BY {order_by} LIMIT {cursor}",
        after=(
            f"SELECT p.id, p.data FROM (SELECT created_at, seq FROM {table} "
            f"WHERE {where} AND id = {cursor}) c CROSS JOIN LATERAL ("
            f"SELECT id, data::text AS data, created_at, seq FROM {table} WHERE {where} "
            f"AND (created_at, seq) {cmp} (c.created_at, c.seq) "
            f"ORDER BY {order_by} LIMIT {limit}) p ORDER BY p.{order_by.replace(', ', ', p.')}"
        ),
        exists=f"SELECT 1 FROM {table} WHERE {where} AND id = {cursor}",
        # The limiter was folded into list pages later (app.pg.admission); the benchmark calls the
        # store with no admission pending, so these are never run.
        first_admitted="",
        after_admitted="",
    )


PRE_RLS: dict[str, Any] = {
    "_THREAD_PAGES": {o: _page_sql("chatkit_threads", "user_id", 1, o) for o in ("asc", "desc")},
    "_ITEM_PAGES": {
        o: _page_sql("chatkit_items", "user_id,thread_id", 2, o) for o in ("asc", "desc")
    },
    "SQL_LOAD_THREAD": "SELECT data::text FROM chatkit_threads WHERE user_id = $1 AND id = $2",
    "SQL_SAVE_THREAD": (
        "INSERT INTO chatkit_threads AS t (user_id, id, created_at, title, data) "
        "VALUES ($1, $2, $3, $4, $5::jsonb) "
        "ON CONFLICT (user_id, id) DO UPDATE SET created_at = EXCLUDED.created_at, "
        "title = EXCLUDED.title, data = EXCLUDED.data, updated_at = now()"
    ),
    "SQL_DELETE_THREAD": "DELETE FROM chatkit_threads WHERE user_id = $1 AND id = $2",
    "SQL_UPSERT_ITEM": (
        "INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data) "
        "VALUES ($1, $2, $3, $4, $5, $6::jsonb) "
        "ON CONFLICT (user_id, thread_id, id) DO UPDATE SET created_at = EXCLUDED.created_at, "
        "type = EXCLUDED.type, data = EXCLUDED.data"
    ),
    "SQL_LOAD_ITEM": (
        "SELECT data::text FROM chatkit_items WHERE user_id = $1 AND thread_id = $2 AND id = $3"
    ),
    "SQL_DELETE_ITEM": (
        "DELETE FROM chatkit_items WHERE user_id = $1 AND thread_id = $2 AND id = $3"
    ),
    "SQL_SAVE_ATTACHMENT": (
        "INSERT INTO chatkit_attachments (user_id, id, thread_id, data) "
        "VALUES ($1, $2, $3, $4::jsonb) "
        "ON CONFLICT (user_id, id) DO UPDATE SET thread_id = EXCLUDED.thread_id, "
        "data = EXCLUDED.data"
    ),
    "SQL_LOAD_ATTACHMENT": (
        "SELECT data::text FROM chatkit_attachments WHERE user_id = $1 AND id = $2"
    ),
    "SQL_DELETE_ATTACHMENT": "DELETE FROM chatkit_attachments WHERE user_id = $1 AND id = $2",
    "SQL_SAVE_FEEDBACK": (
        "INSERT INTO chatkit_feedback (user_id, thread_id, item_id, kind) "
        "SELECT $1, $2, ids.id, $4 FROM unnest($3::text[]) AS ids(id) "
        "ON CONFLICT (user_id, thread_id, item_id) DO UPDATE SET kind = EXCLUDED.kind, "
        "created_at = now()"
    ),
    "SQL_LOAD_FEEDBACK": (
        "SELECT item_id, kind FROM chatkit_feedback WHERE user_id = $1 AND thread_id = $2 "
        "ORDER BY item_id"
    ),
}
assert set(PRE_RLS) <= set(vars(store_module)), "app.pg.store renamed a statement"


@contextmanager
def pre_rls_sql() -> Iterator[None]:
    """While active, ``PostgresStore`` runs the pre-RLS statements (its methods read the module
    constants at call time). Only for one benchmark batch at a time, nothing concurrent."""
    saved = {name: getattr(store_module, name) for name in PRE_RLS}
    for name, value in PRE_RLS.items():
        setattr(store_module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(store_module, name, value)
