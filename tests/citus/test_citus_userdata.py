"""Export and erase of one user on a real Citus cluster (a coordinator and two workers,
tests/harness/citus.py), the example task plugin's table on the coordinator: the round trip,
another user's rows on the same shards untouched, the dry run, and every statement that reads
or deletes a user's rows routed to one shard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from alembic import command

from app.chat.plugins import PluginSet, load_plugins
from app.chat.userdata import erase_user, export_archive
from app.cli.commands import alembic_config
from app.cli.distribute import COORDINATOR_LOCAL
from app.pg import userdata
from app.pg.pool import ConnectionPool, open_pool
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness.citus import (
    CitusCluster,
    distributed_database,
    explain,
    single_shard,
)
from tests.harness.pg import PgServer
from tests.harness.userdata import (
    TASKS_PLUGIN,
    assert_empty,
    assert_matches,
    read_archive,
    row_counts,
    seed_user,
)


@pytest.fixture(scope="module")
async def cluster_db(citus: CitusCluster) -> str:
    """Migrated and distributed as an operator does, then the plugin's branch migrated."""
    url = await distributed_database(citus)
    cfg = alembic_config(url, load_plugins([TASKS_PLUGIN]).migration_locations, quiet=True)
    await asyncio.to_thread(command.upgrade, cfg, "heads")
    return url


@pytest.fixture(scope="module")
async def cpool(
    cluster_db: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ConnectionPool]:
    settings = Settings(database_url=cluster_db, data_dir=tmp_path_factory.mktemp("data"))
    pool = await open_pool(cluster_db, settings)
    yield pool
    await pool.close()


@pytest.fixture
async def owner(cluster_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(PgServer.dsn(cluster_db))
    yield conn
    for table in (*userdata.SQL_ERASE, "plugin_tasks"):
        await conn.execute(f"DELETE FROM {table}")  # Citus: no TRUNCATE ... CASCADE here
    await conn.close()


@pytest.fixture
def plugins() -> PluginSet:
    return load_plugins([TASKS_PLUGIN])


async def test_export_erase_export_on_a_cluster(
    cpool: ConnectionPool, owner: asyncpg.Connection, plugins: PluginSet
) -> None:
    store = PostgresStore(cpool)
    alice = await seed_user(owner, "alice")
    await seed_user(owner, "bob")
    bob = await row_counts(owner, "bob")

    exported = b"".join([p async for p in export_archive(store.pool, plugins, "alice")])
    assert_matches(read_archive(exported), alice)

    before = await row_counts(owner, "alice")
    dry = await erase_user(store.pool, plugins, "alice", dry_run=True)
    assert await row_counts(owner, "alice") == before
    report = await erase_user(store.pool, plugins, "alice")
    assert report.groups == dry.groups and report.rows == sum(before.values())
    assert set((await row_counts(owner, "alice")).values()) == {0}
    assert await row_counts(owner, "bob") == bob
    assert (await erase_user(store.pool, plugins, "alice")).rows == 0

    again = b"".join([p async for p in export_archive(store.pool, plugins, "alice")])
    assert_empty(read_archive(again), "alice")


def _statements() -> dict[str, tuple[str, tuple[object, ...]]]:
    from datetime import UTC, datetime

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    reads = {
        "threads": (userdata.SQL_THREADS, ("alice", t0, 1, 10)),
        "thread ids": (userdata.SQL_THREAD_IDS, ("alice", t0, 1, 10)),
        "items": (userdata.SQL_ITEMS, ("alice", "thr", t0, 1, 10)),
        "feedback": (userdata.SQL_FEEDBACK, ("alice", "", "", 10)),
        "attachments": (userdata.SQL_ATTACHMENTS, ("alice", "", 10)),
        "chunk": (userdata.SQL_CHUNK, ("alice", "atc", 0)),
        "attachment bytes": (userdata.SQL_ATTACHMENT_BYTES, ("alice",)),
    }
    deletes = {t: (sql, ("alice",)) for t, sql in userdata.SQL_ERASE.items()}
    return {**reads, **deletes}


async def test_every_statement_routes_to_one_shard(cluster_db: str) -> None:
    conn = await asyncpg.connect(PgServer.dsn(cluster_db))
    try:
        for name, (sql, args) in _statements().items():
            plan = await explain(conn, sql, args)
            if name in COORDINATOR_LOCAL:
                assert "Custom Plan Provider" not in str(plan), name
            else:
                assert single_shard(plan), name
    finally:
        await conn.close()
