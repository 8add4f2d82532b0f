"""Writes on a Citus cluster: the user's id set for the worker's transaction, not just ours.

On a cluster (``python -m app distribute``, docs/citus.md) the worker holding a user's shard runs
each statement and applies the row-level security policy there, with its own ``app.user_id``.
A read carries it: Citus sends a router SELECT to the worker as it is, so the worker runs the
statement's own ``set_config``. A write cannot: Citus evaluates an INSERT's, UPDATE's or
DELETE's functions on the coordinator before shipping it (the worker would then see no rows and
refuse every new one), and it plans ``INSERT ... SELECT`` from a subquery as a pull to the
coordinator plus COPY, which row-level security forbids. So a write runs here in a transaction
that starts with ``SET LOCAL app.user_id``, which Citus replays on every worker the transaction
uses (``citus.propagate_set_commands = local``), and the statement is its Citus form (recorded
by app.pg.store's builders next to the one-node form: without the gate, inserting from VALUES),
which routes to exactly one shard. Two more round trips than one node's single statement:
BEGIN with the SETs, and COMMIT.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal

import asyncpg

from app.errors import InvalidInputError, MissingUserError

CITUS_INSTALLED = "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')"
# Followed by the user id as a literal: SET takes no parameters.
CITUS_BEGIN = "BEGIN; SET LOCAL citus.propagate_set_commands TO local; SET LOCAL app.user_id TO "

Fetch = Literal["execute", "fetchval", "fetchrow"]


def literal(value: str) -> str:
    """``value`` as an escape-string literal: right whatever ``standard_conforming_strings``
    says. A NUL cannot be part of a query's text at all."""
    if not isinstance(value, str):
        raise MissingUserError("store called without a user_id in its context")
    if "\x00" in value:
        raise InvalidInputError("Text may not contain NUL characters or unpaired surrogates.")
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"E'{escaped}'"


async def _rollback(conn: asyncpg.Connection) -> None:
    """End a failed write's transaction; a connection that cannot is closed (and so dropped by
    the pool at its next checkout), never handed out inside a transaction."""
    try:
        await conn.execute("ROLLBACK")
    except Exception:
        conn.terminate()


async def write_as(
    conn: asyncpg.Connection,
    user_id: str,
    sql: str,
    args: Sequence[Any] = (),
    *,
    fetch: Fetch = "execute",
    rows: Sequence[Sequence[Any]] | None = None,
) -> Any:
    """Run the Citus statement ``sql`` for ``user_id`` in its own transaction, the user set for
    the workers first; with ``rows``, once per row of arguments (executemany: one round trip)."""
    await conn.execute(f"{CITUS_BEGIN}{literal(user_id)}")
    try:
        if rows is not None:
            result: Any = await conn.executemany(sql, rows)
        else:
            result = await getattr(conn, fetch)(sql, *args)
    except BaseException:
        await asyncio.shield(_rollback(conn))
        raise
    await conn.execute("COMMIT")
    return result
