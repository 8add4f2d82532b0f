"""One call on the app's pool, as every part built on PostgreSQL makes it.

The store (app.pg.store), the limits (app.pg.limits), the attachments (app.files.store) and the
plugins' user databases (app.chat.plugins) are each handed the pool (app.pg.pool) by the
lifespan; none borrows through another. What they share is here:

* ``call(pool)``: a borrow whose failures read as the app's errors: the database away (down,
  restarting, no connection free in time) is ``ServiceUnavailableError`` (503), text
  PostgreSQL cannot store is ``InvalidInputError``;
* ``modify(pool, conn, sql, ...)``: a write built by ``gated`` or ``scoped_insert`` (app.pg.sql,
  $1 the user) as one statement on one node; on a Citus cluster a delegated function's call
  where there is one (app.pg.sql.CITUS_CALLS), else its Citus form, run through app.pg.citus.
  Whether the database is a cluster is asked once per pool (``on_citus``).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from app.errors import InvalidInputError, ServiceUnavailableError
from app.pg.citus import CITUS_INSTALLED, Fetch, write_as
from app.pg.engine import is_unavailable
from app.pg.pool import ConnectionPool
from app.pg.sql import CITUS_CALLS, CITUS_FORMS

_UNSTORABLE = (
    asyncpg.UntranslatableCharacterError,
    asyncpg.CharacterNotInRepertoireError,
    UnicodeEncodeError,
)


class Call:
    """``call(pool)``: one borrow (``async with call(pool) as conn``) with the app's errors.
    A class, not ``@asynccontextmanager``: it runs on every store call."""

    __slots__ = ("_borrow",)

    def __init__(self, pool: ConnectionPool) -> None:
        self._borrow = pool.acquire()

    async def __aenter__(self) -> asyncpg.Connection:
        try:
            return await self._borrow.__aenter__()
        except Exception as exc:
            if is_unavailable(exc):
                raise ServiceUnavailableError("database unavailable") from exc
            raise

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        await self._borrow.__aexit__(exc_type, exc, tb)
        if isinstance(exc, _UNSTORABLE):
            raise InvalidInputError(
                "Text may not contain NUL characters or unpaired surrogates."
            ) from exc
        if isinstance(exc, Exception) and is_unavailable(exc):
            raise ServiceUnavailableError("database unavailable") from exc


call = Call


async def on_citus(pool: ConnectionPool, conn: asyncpg.Connection) -> bool:
    """Whether the pool's database is a Citus cluster (the extension is installed); asked once."""
    if pool.citus is None:
        pool.citus = bool(await conn.fetchval(CITUS_INSTALLED))
    return pool.citus


async def modify(
    pool: ConnectionPool, conn: asyncpg.Connection, sql: str, *args: Any, fetch: Fetch = "execute"
) -> Any:
    """Run a write built by ``gated`` or ``scoped_insert`` ($1 the user): one statement on one
    node; on a Citus cluster, its Citus form through app.pg.citus."""
    if not await on_citus(pool, conn):
        return await getattr(conn, fetch)(sql, *args)
    delegated = CITUS_CALLS.get(sql)
    if delegated is not None:  # the function sets the user on the worker it runs on
        return await getattr(conn, fetch)(delegated, *args)
    return await write_as(conn, args[0], CITUS_FORMS[sql], args, fetch=fetch)
