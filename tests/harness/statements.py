"""Every SQL statement of the store, the attachment store and the limiter, with sample
arguments: tests/pg/test_rls.py checks each one's plan (row-level security), and
tests/citus/test_citus.py that each is single-shard on a cluster."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

import app.files.store as attachment_sql
import app.pg.limits as limits_sql
import app.pg.store as store_sql

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def statements() -> dict[str, tuple[str, tuple[Any, ...]]]:
    """Every SQL statement of the store and the attachment store, with sample arguments.

    Fails when a new statement appears without arguments here, so that its plan gets checked.
    """
    u, t, i, a = "alice", "thr_plan", "msg_plan_1", "atc_plan"
    args: dict[str, tuple[Any, ...]] = {
        "store.SQL_LOAD_THREAD": (u, t),
        "store.SQL_SAVE_THREAD": (u, t, T0, "title", "{}"),
        "store.SQL_DELETE_THREAD": (u, t),
        "store.SQL_UPSERT_ITEM": (u, t, i, T0, "user_message", "{}"),
        "store.SQL_ADD_ITEM": (u, t, i, T0, "user_message", "{}"),
        "store.SQL_LOAD_ITEM": (u, t, i),
        "store.SQL_DELETE_ITEM": (u, t, i),
        "store.SQL_SAVE_ATTACHMENT": (u, a, t, "{}"),
        "store.SQL_LOAD_ATTACHMENT": (u, a),
        "store.SQL_DELETE_ATTACHMENT": (u, a),
        "store.SQL_SAVE_FEEDBACK": (u, t, [i, "msg_plan_2"], "positive"),
        "store.SQL_LOAD_FEEDBACK": (u, t),
        "attachments.SQL_INSERT": (u, a, "{}", "pending", 5, "text/plain"),
        "attachments.SQL_CLAIM": (u, a),
        "attachments.SQL_EXISTS": (u, a),
        "attachments.SQL_INSERT_CHUNK": (u, a, 0, b"hello"),
        "attachments.SQL_FINISH": (u, a, 5, "text/plain"),
        "attachments.SQL_DISCARD": (u, a),
        "attachments.SQL_FILE_INFO": (u, a),
        "attachments.SQL_FILES_INFO": (u, [a]),
        "attachments.SQL_READ_CHUNKS": (u, a, 0, 4),
        "limits.SQL_RATE_ADMIT": (u, 0.5, 60.0),
        "limits.SQL_RATE_WAIT": (u, 0.5, 60.0),
        "limits.SQL_LEASE_RENEW": (u, "lease_plan", 30.0),
        "limits.SQL_LEASE_ATTACH": (u, "lease_plan", t),
        "limits.SQL_LEASE_RELEASE": (u, "lease_plan"),
    }
    out: dict[str, tuple[str, tuple[Any, ...]]] = {}
    modules = (("store", store_sql), ("attachments", attachment_sql), ("limits", limits_sql))
    for prefix, module in modules:
        for name, value in vars(module).items():
            if not name.startswith("SQL_") or name == "SQL_ROW_SECURITY_ACTIVE":
                continue
            key = f"{prefix}.{name}"
            assert key in args, f"{key}: add sample arguments so that its plan is checked"
            out[key] = (value, args[key])
    for order in ("asc", "desc"):
        for kind, pages, scope in (
            ("threads", store_sql._THREAD_PAGES, (u,)),
            ("items", store_sql._ITEM_PAGES, (u, t)),
        ):
            sqls = pages[order]  # type: ignore[index]
            cursor = t if kind == "threads" else i
            out[f"{kind} page {order} first"] = (sqls.first, (*scope, 21))
            out[f"{kind} page {order} after"] = (sqls.after, (*scope, cursor, 21))
            out[f"{kind} page {order} exists"] = (sqls.exists, (*scope, cursor))
    return out


async def literal(conn: asyncpg.Connection, value: Any) -> str:
    """``value`` as an SQL literal, for EXPLAIN EXECUTE."""
    if isinstance(value, int | float):
        return str(value)
    cast = {list: "text[]", bytes: "bytea", datetime: "timestamptz"}.get(type(value), "text")
    literal: str = await conn.fetchval(f"SELECT quote_nullable($1::{cast})", value)
    return literal
