"""Alembic is the only way the schema is made; models and migrations never drift."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

from app.pg.tables import metadata
from tests.harness.pg import PgServer, alembic_config, downgrade, migrate

TABLES = {
    "chatkit_threads",
    "chatkit_items",
    "chatkit_attachments",
    "chatkit_attachment_blobs",
    "chatkit_feedback",
    "chatkit_rate_limits",
    "chatkit_stream_leases",
}


@pytest.fixture
async def scratch_db(pg_server: PgServer) -> AsyncIterator[str]:
    url = await pg_server.create_database("ckpg_mig")
    yield url
    await pg_server.drop_database(url)


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(PgServer.dsn(url))
    try:
        rows = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'chatkit_%'"
        )
    finally:
        await conn.close()
    return {r[0] for r in rows}


async def _diff(url: str) -> list[object]:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda c: compare_metadata(
                    MigrationContext.configure(c, opts={"compare_type": True}), metadata
                )
            )
    finally:
        await engine.dispose()


async def test_upgrade_downgrade_upgrade(scratch_db: str) -> None:
    assert await _tables(scratch_db) == set()
    await asyncio.to_thread(migrate, scratch_db)
    assert await _tables(scratch_db) == TABLES
    await asyncio.to_thread(downgrade, scratch_db, "base")
    assert await _tables(scratch_db) == set()
    await asyncio.to_thread(migrate, scratch_db)
    assert await _tables(scratch_db) == TABLES


async def test_each_revision_steps_down_and_up(scratch_db: str) -> None:
    script = ScriptDirectory.from_config(alembic_config(scratch_db))
    revisions = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert revisions, "no migrations found"
    for rev in revisions:
        await asyncio.to_thread(migrate, scratch_db, rev)
        await asyncio.to_thread(downgrade, scratch_db, "-1")
        await asyncio.to_thread(migrate, scratch_db, rev)


async def test_autogenerate_finds_no_drift(scratch_db: str) -> None:
    await asyncio.to_thread(migrate, scratch_db)
    assert await _diff(scratch_db) == []


async def test_drift_detector_can_fail(scratch_db: str) -> None:
    """The comparison above is meaningful: a missing index is reported."""
    await asyncio.to_thread(migrate, scratch_db)
    conn = await asyncpg.connect(PgServer.dsn(scratch_db))
    try:
        await conn.execute("DROP INDEX ix_chatkit_items_user_id_thread_id_created_at_seq")
    finally:
        await conn.close()
    diff = await _diff(scratch_db)
    assert any("add_index" in str(d) for d in diff), diff


async def test_only_the_limits_tables_are_unlogged(scratch_db: str) -> None:
    """The limiter's rows skip the WAL (and are emptied by a crash); conversations never do."""
    await asyncio.to_thread(migrate, scratch_db)
    conn = await asyncpg.connect(PgServer.dsn(scratch_db))
    try:
        rows = await conn.fetch(
            "SELECT relname, relpersistence FROM pg_class "
            "WHERE relkind = 'r' AND relname LIKE 'chatkit\\_%'"
        )
    finally:
        await conn.close()
    unlogged = {r[0] for r in rows if r[1] == b"u"}  # a "char": bytes
    assert unlogged == {"chatkit_rate_limits", "chatkit_stream_leases"}
    assert {r[0] for r in rows} == TABLES
    # The models say the same, so a table made from them would match.
    assert {t.name for t in metadata.sorted_tables if "UNLOGGED" in t._prefixes} == unlogged
