"""The run log (docs/runs.md) on a real Citus cluster, as the tables' owner: distributed by
``user_id`` with the content, UNLOGGED on every shard, and every run log call delegated to one
worker, the user's (one task in Citus' EXPLAIN, no subplan on the coordinator), with custom and
generic plans.

Resuming and cancelling across two processes on the cluster, as the app's role (the policies
applied on the workers), are tests/http/test_runs.py's own tests on the ``citus-role`` backend.
"""

from __future__ import annotations

import json

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from app.cli.distribute import DISTRIBUTED, DISTRIBUTED_FUNCTIONS
from app.pg.runlog import RUN_ABANDON, RUN_APPEND, RUN_CANCEL, RUN_READ, RUN_START
from tests.harness.citus import CitusCluster, explain, single_shard, worker_fetch
from tests.harness.pg import PgServer

pytestmark = pytest.mark.backends("citus")

RUN_TABLES = ("chatkit_runs", "chatkit_run_events")
STATEMENTS = {
    "start": (RUN_START, ("alice", "run_plan", "thr_plan")),
    "append": (RUN_APPEND, ("alice", "run_plan", 1, ["data: {}"], "running")),
    "read": (RUN_READ, ("alice", "run_plan", 0, 500, 600.0)),
    "cancel": (RUN_CANCEL, ("alice", "run_plan", 600.0)),
    "abandon": (RUN_ABANDON, ("alice", "run_plan", 5.0)),
}


async def test_the_run_log_is_distributed_with_the_content(
    database_url: str, citus: CitusCluster
) -> None:
    conn = await asyncpg.connect(PgServer.dsn(database_url))
    try:
        groups = dict(
            await conn.fetch(
                "SELECT logicalrelid::text, colocationid FROM pg_dist_partition "
                "WHERE partmethod = 'h' "
                "AND column_to_column_name(logicalrelid, partkey) = 'user_id'"
            )
        )
        functions = await conn.fetch(
            "SELECT p.oid::regprocedure::text, d.distribution_argument_index, d.colocationid "
            "FROM pg_dist_object d JOIN pg_proc p ON p.oid = d.objid "
            "WHERE d.classid = 'pg_proc'::regclass AND d.distribution_argument_index IS NOT NULL"
        )
    finally:
        await conn.close()
    assert set(RUN_TABLES) <= set(groups) and set(DISTRIBUTED) == set(groups)
    assert {groups[t] for t in DISTRIBUTED} == {groups["chatkit_threads"]}
    # Each function by its first argument (the user), in the same group: a call goes to the
    # worker holding that user's shards.
    assert sorted(
        (name.replace(",", ", "), index, group) for name, index, group in functions
    ) == sorted((f, 0, groups["chatkit_threads"]) for f in DISTRIBUTED_FUNCTIONS)
    database = str(make_url(database_url).database)
    for index in range(len(citus.workers)):
        shards = await worker_fetch(
            citus,
            index,
            database,
            "SELECT relname::text, relpersistence::text FROM pg_class WHERE relkind = 'r' "
            "AND (relname LIKE 'chatkit_runs_%' OR relname LIKE 'chatkit_run_events_%')",
        )
        assert shards and {r[1] for r in shards} == {"u"}, shards  # UNLOGGED, every shard


@pytest.mark.parametrize("which", ("first", "settled"))
async def test_every_run_log_call_goes_to_one_worker(database_url: str, which: str) -> None:
    conn = await asyncpg.connect(PgServer.dsn(database_url))
    try:
        for name, (sql, args) in STATEMENTS.items():
            plan = await explain(conn, sql, args, which)
            assert single_shard(plan), (name, which, json.dumps(plan, indent=1))
    finally:
        await conn.close()
