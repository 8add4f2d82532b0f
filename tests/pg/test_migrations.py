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
from tests.harness.backends import ROLE_TABLES
from tests.harness.pg import PgServer, alembic_config, downgrade, migrate

TABLES = set(ROLE_TABLES)  # every table of the schema, each granted to the app's role


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


# Revision 0007 replaces these two indexes of 0005 only where the server has btree_gin (the
# embedded development server has no contrib extensions): there they are the expected drift.
SEARCH_INDEXES = {
    "ix_chatkit_items_search_vector",
    "ix_chatkit_threads_search_vector",
    "ix_chatkit_items_user_id_search_vector",
    "ix_chatkit_threads_user_id_search_vector",
}


async def _has_btree_gin(url: str) -> bool:
    conn = await asyncpg.connect(PgServer.dsn(url))
    try:
        return bool(
            await conn.fetchval(
                "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'btree_gin')"
            )
        )
    finally:
        await conn.close()


def _search_index_change(change: object) -> bool:
    return (
        isinstance(change, tuple)
        and change[0] in ("add_index", "remove_index")
        and change[1].name in SEARCH_INDEXES
    )


async def test_autogenerate_finds_no_drift(scratch_db: str) -> None:
    await asyncio.to_thread(migrate, scratch_db)
    diff = await _diff(scratch_db)
    if not await _has_btree_gin(scratch_db):
        diff = [change for change in diff if not _search_index_change(change)]
    assert diff == []


async def test_the_search_indexes_lead_with_the_user_where_btree_gin_is(scratch_db: str) -> None:
    """Revision 0007: GIN on (user_id, search_vector), built again after an interrupted build
    and idempotent on a second run; without btree_gin, 0005's indexes stay."""
    await asyncio.to_thread(migrate, scratch_db)
    conn = await asyncpg.connect(PgServer.dsn(scratch_db))
    try:
        query = (
            "SELECT indexrelid::regclass::text, indisvalid FROM pg_index "
            "WHERE indrelid IN ('chatkit_items'::regclass, 'chatkit_threads'::regclass) "
            "AND indexrelid::regclass::text LIKE '%search_vector' ORDER BY 1"
        )
        found = dict(await conn.fetch(query))
        if not await _has_btree_gin(scratch_db):
            old = ("ix_chatkit_items_search_vector", "ix_chatkit_threads_search_vector")
            assert found == dict.fromkeys(old, True)
            return
        expected = {
            "ix_chatkit_items_user_id_search_vector": True,
            "ix_chatkit_threads_user_id_search_vector": True,
        }
        assert found == expected
        # An interrupted build: the index is left invalid; running 0007 again rebuilds it.
        await conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = "
            "'ix_chatkit_items_user_id_search_vector'::regclass"
        )
        head = await conn.fetchval("SELECT version_num FROM alembic_version")
        # 0007 again, twice (the revisions after it are not meant to run twice).
        for _ in range(2):
            await conn.execute("UPDATE alembic_version SET version_num = '0006'")
            await asyncio.to_thread(migrate, scratch_db, "0007")
        await conn.execute("UPDATE alembic_version SET version_num = $1", head)
        assert dict(await conn.fetch(query)) == expected
    finally:
        await conn.close()


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


async def test_only_the_limits_and_run_log_tables_are_unlogged(scratch_db: str) -> None:
    """The limiter's rows and the run log skip the WAL (and are emptied by a crash);
    conversations never do."""
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
    assert unlogged == {
        "chatkit_rate_limits",
        "chatkit_stream_leases",
        "chatkit_runs",
        "chatkit_run_events",
    }
    assert {r[0] for r in rows} == TABLES
    # The models say the same, so a table made from them would match.
    assert {t.name for t in metadata.sorted_tables if "UNLOGGED" in t._prefixes} == unlogged
