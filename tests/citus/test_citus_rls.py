"""Row-level security on a real Citus cluster, through the app's role (NOBYPASSRLS).

On a cluster the policy is checked by the worker holding the user's shard, with the worker's own
``app.user_id``; app.pg.store explains how each statement gets it there. This module, on the session's
cluster (tests/harness/citus.py) and its database, migrated and distributed:

* is one of the places the ``citus-role`` backend (tests/harness/backends.py) runs: the store
  contract (tests/pg/test_store.py), the attachment contract with the bytes in
  ``chatkit_attachment_blobs`` (tests/files/test_attachments.py), the ChatKit protocol through
  ``create_app`` (tests/http/test_app_protocol.py) and tests/pg/test_rls.py's tests that hold on
  any PostgreSQL name it too: there the ``store`` (and the app) connect as a fresh role subject
  to the policies, while the tests' raw checks use the owner's ``engine``;
* proves that the setting reaches the worker: a read reports the worker that ran it and the user
  set there; a write lands in the user's shard on its worker, while the same statement without the
  propagated SET LOCAL is refused by that worker's policy, and the one-node gated form changes
  nothing there;
* shows an unscoped SELECT on the app's connection sees only the user set (by SET LOCAL, the form
  Citus replays on the workers) and nothing without one, and that writes for another user are
  refused on the workers;
* finds the policy, enabled, on every shard of every content table on both workers.

tests/pg/test_rls.py's plan-shape checks are one-node plans and stay there; tests/citus/test_citus.py
checks that every statement is single-shard.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

import app.pg.sql as pg_sql
import app.pg.store as store_sql
from app.cli.distribute import DISTRIBUTED
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness import factories as f
from tests.harness.backends import CONTENT_TABLES, ROLE_TABLES
from tests.harness.citus import CitusCluster, worker_fetch
from tests.harness.pg import PgServer
from tests.harness.rls import ALICE, BOB, counts_by_user, seed_two_users

TABLES = ROLE_TABLES

# The cluster's database as the app's role (tests/conftest.py: ``app_role_url``, ``store``,
# ``pooled_store``; ``engine`` and ``pool`` are the owner's).
pytestmark = pytest.mark.backends("citus-role")


# --- the setting reaches the worker -------------------------------------------------------------

WHERE_AM_I = store_sql.gated_select(
    "q.setting, q.port",
    "SELECT current_setting('app.user_id', true) AS setting, inet_server_port() AS port "
    "FROM chatkit_threads WHERE user_id = $1",
)


async def _shard_of(conn: asyncpg.Connection, table: str, user: str) -> tuple[str, int]:
    """The shard holding ``user``'s rows of ``table``, and the port of its worker."""
    row = await conn.fetchrow(
        "SELECT shard_name::text, nodeport FROM citus_shards WHERE table_name = $1::regclass "
        "AND shardid = get_shard_id_for_distribution_column($1, $2::text)",
        table,
        user,
    )
    assert row is not None
    return row[0], row[1]


async def test_a_read_sets_the_user_on_the_worker_that_runs_it(
    store: PostgresStore, engine: AsyncEngine, database_url: str, app_role_url: str, citus: Any
) -> None:
    # "alice" and "bob" hash to shards on different workers (checked): both are exercised.
    owner = await asyncpg.connect(PgServer.dsn(database_url))
    app = await asyncpg.connect(PgServer.dsn(app_role_url))
    try:
        ports = {}
        for ctx in (ALICE, BOB):
            await store.save_thread(f.thread(), ctx)
            ports[ctx["user_id"]] = (await _shard_of(owner, "chatkit_threads", ctx["user_id"]))[1]
        assert set(ports.values()) == {w.port for w in citus.workers}
        for user, port in ports.items():
            assert [tuple(r) for r in await app.fetch(WHERE_AM_I, user)] == [(user, port)]
        # and the coordinator's own session was never set
        assert await app.fetchval("SELECT current_setting('app.user_id', true)") in ("", None)
    finally:
        await app.close()
        await owner.close()


async def test_a_write_lands_through_the_workers_policy_only_with_the_propagated_setting(
    store: PostgresStore, database_url: str, app_role_url: str, citus: Any
) -> None:
    thread = f.thread(title="kept")
    await store.save_thread(thread, ALICE)  # the store's cluster path: accepted by the worker
    owner = await asyncpg.connect(PgServer.dsn(database_url))
    app = await asyncpg.connect(PgServer.dsn(app_role_url))
    try:
        shard, port = await _shard_of(owner, "chatkit_threads", "alice")
        [index] = [i for i, w in enumerate(citus.workers) if w.port == port]
        on_worker = await worker_fetch(
            citus,
            index,
            str(make_url(database_url).database),
            f"SELECT id, title FROM {shard} WHERE user_id = 'alice'",
        )
        assert [tuple(r) for r in on_worker] == [(thread.id, "kept")]

        citus_insert = pg_sql.CITUS_FORMS[store_sql.SQL_SAVE_THREAD]
        args = ("alice", "thr_other", f.T0, "t", "{}")
        # The same statement without the SET LOCAL: that worker's policy refuses the row.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=shard):
            await app.execute(citus_insert, *args)
        # The one-node gated delete sets the coordinator only: the worker sees no row to delete.
        assert await app.execute(store_sql.SQL_DELETE_THREAD, "alice", thread.id) == "DELETE 0"
        assert (await store.load_thread(thread.id, ALICE)).title == "kept"
        await store.delete_thread(thread.id, ALICE)  # the store's path deletes it
        assert await owner.fetchval("SELECT count(*) FROM chatkit_threads") == 0
    finally:
        await app.close()
        await owner.close()


# --- unscoped statements on the app's own connection ------------------------------------------


async def test_unscoped_select_sees_only_the_user_set_and_nothing_without(
    pooled_store: PostgresStore, engine: AsyncEngine, test_settings: Settings
) -> None:
    store = pooled_store
    await seed_two_users(store, test_settings)
    everything = await counts_by_user(engine, TABLES)
    assert all(set(by_user) == {"alice", "bob"} for by_user in everything.values())
    async with store.connection() as conn:
        for user in ("alice", "bob"):
            async with conn.transaction():
                await conn.execute(
                    "SET LOCAL citus.propagate_set_commands TO local; "
                    f"SET LOCAL app.user_id TO '{user}'"
                )
                for table in TABLES:  # multi-shard reads: both workers answer
                    owners = [r[0] for r in await conn.fetch(f"SELECT user_id FROM {table}")]
                    assert owners and set(owners) == {user}, table
                    assert len(owners) == everything[table][user], table
        for table in TABLES:
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
        async with conn.transaction():
            # set_config() in a statement of its own sets the coordinator only: the workers,
            # which hold the content tables, still see no user.
            await conn.execute("SELECT set_config('app.user_id', 'alice', true)")
            for table in CONTENT_TABLES:
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table


async def test_writes_for_another_user_are_refused_on_the_workers(
    pooled_store: PostgresStore, engine: AsyncEngine
) -> None:
    store = pooled_store
    thread = f.thread()
    await store.save_thread(thread, ALICE)
    refused: list[tuple[str | None, str, tuple[Any, ...]]] = [
        ("alice", "INSERT INTO chatkit_threads (user_id, id, created_at, data) "
         "VALUES ('bob', $1, now(), '{}')", (thread.id + "_x",)),
        (None, "INSERT INTO chatkit_threads (user_id, id, created_at, data) "
         "VALUES ('alice', $1, now(), '{}')", (thread.id + "_y",)),
        ("alice", "INSERT INTO chatkit_attachment_blobs (user_id, attachment_id, chunk_no, data) "
         "VALUES ('bob', 'atc_x', 0, '\\x00')", ()),
        ("bob", "UPDATE chatkit_threads SET title = 'mine' WHERE user_id = 'alice'", ()),
    ]  # fmt: skip
    async with store.connection() as conn:
        for user, sql, args in refused:
            async with conn.transaction():
                if user is not None:
                    await conn.execute(
                        "SET LOCAL citus.propagate_set_commands TO local; "
                        f"SET LOCAL app.user_id TO '{user}'"
                    )
                if sql.startswith("UPDATE"):
                    assert await conn.execute(sql, *args) == "UPDATE 0"  # alice's row unseen
                else:
                    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level"):
                        await conn.execute(sql, *args)
    assert await counts_by_user(engine) == {
        "chatkit_threads": {"alice": 1},
        "chatkit_items": {},
        "chatkit_attachments": {},
        "chatkit_attachment_blobs": {},
        "chatkit_feedback": {},
    }
    assert (await store.load_thread(thread.id, ALICE)).title == thread.title


# --- the policy on every shard ------------------------------------------------------------------


async def test_every_shard_has_the_policy_enabled(
    database_url: str,
    citus: CitusCluster,
) -> None:
    owner = await asyncpg.connect(PgServer.dsn(database_url))
    try:
        shards = await owner.fetch(
            "SELECT shard_name::text, nodeport FROM citus_shards "
            "WHERE table_name::text = ANY($1::text[])",
            list(DISTRIBUTED),
        )
    finally:
        await owner.close()
    assert len(shards) == 32 * len(DISTRIBUTED)
    db = str(make_url(database_url).database)
    for index, worker in enumerate(citus.workers):
        mine = sorted(r[0] for r in shards if r[1] == worker.port)
        assert mine
        rows = await worker_fetch(
            citus,
            index,
            db,
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity, p.qual, p.with_check "
            "FROM pg_class c JOIN pg_policies p ON p.tablename = c.relname "
            "AND p.policyname = 'chatkit_user_isolation' "
            "WHERE c.relname ~ '^chatkit_[a-z_]+_[0-9]+$' ORDER BY c.relname",
        )
        assert [r[0] for r in rows if r[0] in mine] == mine
        expected = "(user_id = current_setting('app.user_id'::text, true))"
        for r in rows:
            assert (r[1], r[2], r[3], r[4]) == (True, False, expected, expected), r[0]


async def test_an_awkward_user_id_reaches_the_worker_intact(store: PostgresStore) -> None:
    """The write path spells the user as a literal (SET takes no parameters): quotes,
    backslashes and the like must arrive as they are, and only for that user."""
    awkward = {"user_id": "o'brien \\' \\\\x41 \"; SET app.user_id = 'bob' -- é"}
    thread = f.thread(title="t")
    await store.save_thread(thread, awkward)
    assert await store.load_thread(thread.id, awkward) == thread
    assert (await store.load_threads(5, None, "asc", BOB)).data == []
    await store.delete_thread(thread.id, awkward)
    assert (await store.load_threads(5, None, "asc", awkward)).data == []
