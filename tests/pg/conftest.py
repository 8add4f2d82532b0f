"""A private PostgreSQL per module, for the tests that stop, freeze or restart their server
(test_consistent_failure.py, test_pg_frozen.py, test_pg_restart.py): the session's server is
shared, so it is never theirs to break."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from tests.harness.backends import TABLES
from tests.harness.pg import migrate
from tests.harness.pginstance import PRIVATE_DATABASE, PgInstance, private_postgres


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PgInstance]:
    with private_postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
async def private_url(private_pg: PgInstance) -> str:
    """``PRIVATE_DATABASE`` on the private server, migrated with Alembic."""
    conn = await asyncpg.connect(private_pg.dsn())
    try:
        await conn.execute(f'CREATE DATABASE "{PRIVATE_DATABASE}"')
    finally:
        await conn.close()
    url = private_pg.url(PRIVATE_DATABASE)
    await asyncio.to_thread(migrate, url)
    return url


async def _ensure_running(pg: PgInstance) -> None:
    if pg.postmaster_pid() is None:
        await asyncio.to_thread(pg.start)


@pytest.fixture
async def pg(private_pg: PgInstance, private_url: str) -> AsyncIterator[PgInstance]:
    """The private server, running; running again (a frozen one is continued by its test)
    and with empty tables after the test, whatever state a failure left it in."""
    await _ensure_running(private_pg)
    yield private_pg
    await _ensure_running(private_pg)
    conn = await asyncpg.connect(private_pg.dsn(PRIVATE_DATABASE), timeout=10)
    try:
        await conn.execute(f"TRUNCATE {TABLES} CASCADE")
    finally:
        await conn.close()
