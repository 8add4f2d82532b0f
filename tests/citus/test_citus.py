"""The schema distributed on a real Citus cluster (coordinator + 2 workers, tests/harness/citus.py).

Here, as the tables' owner on the coordinator:

* ``python -m app distribute`` itself: refuses before the migrations and without the extension,
  distributes, and a second run changes nothing and says so;
* the layout: every content table hash-distributed by ``user_id`` in one co-location group with
  shards on both workers (the run log's too, UNLOGGED on every shard); the limiter's tables
  kept on the coordinator;
* every statement of the store, the attachment store and the limiter is single-shard (one task
  in Citus' EXPLAIN, no subplan run first) or, for the limiter, a coordinator-local statement,
  with custom and with generic plans;
* a later Alembic revision (a throwaway one adding a column and an index) applies to every shard
  and rolls back;
* ``prune`` counts on the cluster and refuses to delete there (see docs/citus.md);
* list pages leave their admission to the endpoint here instead of folding it (app.pg.admission).

The limits contract (tests/pg/test_limits_store.py: exact budgets under races, one stream lease
per thread, concurrent takers) names the ``citus`` backend (tests/harness/backends.py), which this
module uses too: the session's cluster and its distributed database, as the owner.

The store, attachment and protocol contracts through the app's role (row-level security on the
workers) are in tests/citus/test_citus_rls.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app.background import TaskRegistry
from app.cli.distribute import COORDINATOR_LOCAL, DISTRIBUTED, DISTRIBUTED_FUNCTIONS
from app.cli.prune import prune
from app.context import RequestContext
from app.errors import ConfigurationError, TooManyRequestsError
from app.pg.limits import Limits
from app.pg.store import PostgresStore
from app.settings import PROJECT_ROOT, Settings
from tests.harness import factories as f
from tests.harness.citus import (
    CitusCluster,
    citus_statements,
    distributed_database,
    explain,
    find_all,
    single_shard,
    worker_fetch,
)
from tests.harness.pg import PgServer, alembic_config, migrate
from tests.harness.statements import statements

# The session's cluster and its database, as the owner (tests/conftest.py).
pytestmark = pytest.mark.backends("citus")


async def _owner(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(PgServer.dsn(url))


def _database(url: str) -> str:
    return str(make_url(url).database)


async def test_the_pool_leaves_the_plan_cache_mode_on_a_cluster(store: PostgresStore) -> None:
    """One node forces generic plans (app.pg.pool); Citus refuses those for statements it cannot
    route without their parameters, so on a cluster the pool keeps PostgreSQL's default."""
    async with store.connection() as conn:
        assert await conn.fetchval("SHOW plan_cache_mode") == "auto"


async def test_list_pages_leave_their_admission_to_the_endpoint(
    store: PostgresStore, test_settings: Settings
) -> None:
    """The page is a worker's and the budget the coordinator's, so the store does not fold
    them into one statement (app.pg.admission): the admission stays pending, and the endpoint's
    ``settle`` counts it, exactly, after the page."""
    thread = f.thread()
    await store.save_thread(thread, {"user_id": "alice"})
    limits = Limits(
        store.pool, test_settings.model_copy(update={"rate_limit_per_minute": 2}), TaskRegistry()
    )
    for n in range(3):
        admission = limits.defer("alice")
        alice = RequestContext("alice", page_fold=admission)
        page = await store.load_threads(5, None, "desc", alice)
        assert [t.id for t in page.data] == [thread.id]
        assert admission is not None and not admission.consumed
        if n < 2:
            await limits.settle(admission)
        else:
            with pytest.raises(TooManyRequestsError):
                await limits.settle(admission)
        assert admission.consumed


# --- python -m app distribute ----------------------------------------------------------------


def _distribute(url: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url, "DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "app", "distribute"],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


async def test_distribute_command_refuses_distributes_and_is_idempotent(
    citus: CitusCluster,
    tmp_path: Path,
) -> None:
    url = await citus.create_database()
    early = await asyncio.to_thread(_distribute, url, tmp_path)
    assert early.returncode == 2, early
    assert early.stderr.strip() == (
        "cannot distribute: table chatkit_threads does not exist: run `python -m app migrate` first"
    )

    await asyncio.to_thread(migrate, url)
    first = await asyncio.to_thread(_distribute, url, tmp_path)
    assert first.returncode == 0, first
    assert first.stdout.splitlines() == [
        *(f"distributed by user_id: {t}" for t in DISTRIBUTED),
        f"functions delegated by p_user: {len(DISTRIBUTED_FUNCTIONS)}",
        f"kept on the coordinator (limits): {', '.join(COORDINATOR_LOCAL)}",
    ]
    conn = await _owner(url)
    try:
        layout = await conn.fetch("SELECT * FROM pg_dist_partition ORDER BY logicalrelid::text")
        second = await asyncio.to_thread(_distribute, url, tmp_path)
        assert await conn.fetch("SELECT * FROM pg_dist_partition ORDER BY logicalrelid::text") == (
            layout
        )
    finally:
        await conn.close()
    assert second.returncode == 0, second
    assert second.stdout.splitlines() == [
        *(f"already distributed by user_id: {t}" for t in DISTRIBUTED),
        f"functions delegated by p_user: {len(DISTRIBUTED_FUNCTIONS)}",
        f"kept on the coordinator (limits): {', '.join(COORDINATOR_LOCAL)}",
        "nothing to do: every table was already distributed",
    ]

    plain = await citus.create_database(citus=False)
    await asyncio.to_thread(migrate, plain)
    refused = await asyncio.to_thread(_distribute, plain, tmp_path)
    assert refused.returncode == 2, refused
    assert "the citus extension is not installed in this database" in refused.stderr
    assert "Traceback" not in refused.stderr


async def test_content_tables_are_distributed_by_user_and_colocated(
    database_url: str,
    citus: CitusCluster,
) -> None:
    conn = await _owner(database_url)
    try:
        rows = await conn.fetch(
            "SELECT logicalrelid::text, partmethod::text, "
            "column_to_column_name(logicalrelid, partkey), colocationid FROM pg_dist_partition"
        )
        placed = await conn.fetch(
            "SELECT table_name::text, count(*), count(DISTINCT nodeport) FROM citus_shards "
            "GROUP BY table_name"
        )
        kinds = await conn.fetch(
            "SELECT relname, relpersistence::text FROM pg_class WHERE relname = ANY($1::text[])",
            list(COORDINATOR_LOCAL),
        )
    finally:
        await conn.close()
    layout = {r[0]: (r[1], r[2]) for r in rows}
    assert layout == {t: ("h", "user_id") for t in DISTRIBUTED}  # nothing else distributed
    assert len({r[3] for r in rows}) == 1  # one co-location group
    workers = {w.port for w in citus.workers}
    assert {r[0]: (r[1], r[2]) for r in placed} == {t: (32, len(workers)) for t in DISTRIBUTED}
    # the limiter's tables: plain UNLOGGED tables on the coordinator
    assert {r[0]: r[1] for r in kinds} == {t: "u" for t in COORDINATOR_LOCAL}


# --- every statement routes to one shard --------------------------------------------------------


# A prepared statement's plans as the app gets them: custom for its first five executions, then
# whichever plan_cache_mode=auto settles on (Citus prices a generic plan it could not route as
# exorbitant, so PostgreSQL keeps making custom ones; one it can route is pruned at execution).
PLANS = ("first", "settled")


@pytest.mark.parametrize("which", PLANS)
async def test_every_statement_is_single_shard(database_url: str, which: str) -> None:
    conn = await _owner(database_url)
    try:
        every = citus_statements()
        for name, (sql, args) in every.items():
            plan = await explain(conn, sql, args, which)
            if name.startswith("limits."):
                # the coordinator's own tables: no distributed step at all
                assert not find_all(plan, "Custom Plan Provider"), (name, plan)
                assert set(find_all(plan, "Relation Name")) <= set(COORDINATOR_LOCAL), name
            else:
                assert single_shard(plan), (name, which, json.dumps(plan, indent=1))
        assert len([n for n in every if not n.startswith("limits.")]) >= 30
    finally:
        await conn.close()


async def test_the_one_node_writes_would_not_route_alone(database_url: str) -> None:
    """Why the store sends the Citus forms: the one-node shapes of the writes run their gate
    as a subplan on the coordinator, or an INSERT ... SELECT pulled to it."""
    conn = await _owner(database_url)
    try:
        for name, (sql, args) in statements().items():
            if name.startswith("limits.") or sql.split(None, 1)[0] == "SELECT":
                continue
            assert not single_shard(await explain(conn, sql, args)), name
    finally:
        await conn.close()


# --- migrations after distribution ---------------------------------------------------------------

THROWAWAY = '''"""A throwaway revision (tests/citus/test_citus.py): a column and an index after distribution."""

import sqlalchemy as sa
from alembic import op

revision = "citus_throwaway"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("chatkit_items", sa.Column("note", sa.Text(), nullable=True))
    op.create_index("ix_chatkit_threads_user_id_updated_at", "chatkit_threads",
                    ["user_id", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_chatkit_threads_user_id_updated_at", table_name="chatkit_threads")
    op.drop_column("chatkit_items", "note")
'''

SHARDS_WITH_NOTE = (
    "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
    "WHERE c.relname ~ '^chatkit_items_[0-9]+$' AND a.attname = 'note' AND NOT a.attisdropped"
)
SHARDS_WITH_INDEX = (
    "SELECT count(*) FROM pg_class WHERE relkind = 'i' "
    "AND relname ~ '^ix_chatkit_threads_user_id_updated_at_[0-9]+$'"
)


@pytest.fixture
def throwaway_scripts(tmp_path: Path) -> Iterator[Path]:
    scripts = tmp_path / "migrations"
    shutil.copytree(PROJECT_ROOT / "migrations", scripts, ignore=shutil.ignore_patterns("__py*"))
    head = ScriptDirectory.from_config(alembic_config("postgresql://unused")).get_current_head()
    (scripts / "versions" / "29991231_citus_throwaway.py").write_text(THROWAWAY.format(down=head))
    yield scripts


async def test_a_later_revision_applies_on_every_shard(
    citus: CitusCluster,
    throwaway_scripts: Path,
) -> None:
    url = await distributed_database(citus)
    db = _database(url)
    cfg = alembic_config(url)
    cfg.set_main_option("script_location", str(throwaway_scripts))

    async def on_workers(sql: str) -> list[int]:
        return [(await worker_fetch(citus, i, db, sql))[0][0] for i in range(len(citus.workers))]

    assert await on_workers(SHARDS_WITH_NOTE) == [0, 0]
    await asyncio.to_thread(command.upgrade, cfg, "head")
    conn = await _owner(url)
    try:
        per_worker = await conn.fetch(
            "SELECT nodeport, count(*) FROM citus_shards WHERE table_name = $1::regclass "
            "GROUP BY nodeport ORDER BY nodeport",
            "chatkit_items",
        )
        expected = [r[1] for r in per_worker]
        assert sum(expected) == 32 and len(expected) == 2
        assert await on_workers(SHARDS_WITH_NOTE) == expected  # every shard has the column
        assert await on_workers(SHARDS_WITH_INDEX) == expected  # and the index
        # the new column works through the coordinator, routed to the user's shard
        await conn.execute(
            "INSERT INTO chatkit_threads (user_id, id, created_at, data) "
            "VALUES ('alice', 't1', now(), '{}')"
        )
        await conn.execute(
            "INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data, note) "
            "VALUES ('alice', 't1', 'i1', now(), 'user_message', '{}', 'noted')"
        )
        assert await conn.fetchval("SELECT note FROM chatkit_items WHERE user_id = 'alice'") == (
            "noted"
        )
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == ("citus_throwaway")
    finally:
        await conn.close()
    await asyncio.to_thread(command.downgrade, cfg, "-1")
    assert await on_workers(SHARDS_WITH_NOTE) == [0, 0]
    assert await on_workers(SHARDS_WITH_INDEX) == [0, 0]


# --- prune ------------------------------------------------------------------------------------


async def test_prune_counts_on_the_cluster_and_refuses_to_delete(
    store: PostgresStore, engine: AsyncEngine, database_url: str, test_settings: Settings
) -> None:
    conn = await _owner(database_url)
    try:
        await conn.execute(
            "INSERT INTO chatkit_threads (user_id, id, created_at, updated_at, data) VALUES "
            "('alice', 'old', now() - interval '400 days', now() - interval '400 days', '{}'), "
            "('bob', 'new', now(), now(), '{}')"
        )
    finally:
        await conn.close()
    settings = test_settings.model_copy(update={"retention_days": 30})
    report = await prune(engine, settings, dry_run=True)
    assert (report.threads, report.orphan_attachments) == (1, 0)
    with pytest.raises(ConfigurationError, match="Citus cluster"):
        await prune(engine, settings, dry_run=False)
    conn = await _owner(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM chatkit_threads") == 2  # untouched
    finally:
        await conn.close()
