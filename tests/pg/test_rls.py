"""Row-level security (migration 0003): PostgreSQL's own wall behind the store's ``user_id`` filters.

The app connects as a role without BYPASSRLS, and every statement of the store and of the
attachment store sets ``app.user_id`` for its own transaction (app.pg.store explains the statement
shapes that make PostgreSQL set it before reading any chatkit_ table). This module creates such a
role on the test server (random name, dropped at the end) and proves:

* the whole store and attachment contract holds through it, with custom and with generic plans:
  the test functions of tests/pg/test_store.py and tests/files/test_attachments.py run again here, where
  the ``store`` fixture is a PostgresStore connecting as that role (their raw-SQL checks use the
  owner's ``engine``, which bypasses row-level security and so sees every row);
* the plan of every statement makes the setting before it reads a table, custom and generic, and
  the keyset page stays an index range scan under the policy;
* a deliberately unscoped SELECT on the app's own pooled connection sees only the current user's
  rows, none with no user set, and the setting never outlives the statement that made it;
* a row written for another user than the one set is refused (WITH CHECK).

A misordered statement could never show another user's rows (the store's own filter still
applies); it would see *no* rows, which the contract tests would catch as missing data.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import asyncpg
import pytest
from chatkit.store import NotFoundError
from chatkit.types import AttachmentCreateParams
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

import app.files.store as attachment_sql
import app.pg.limits as limits_sql
import app.pg.store as store_sql
from app.background import TaskRegistry
from app.cli.prune import prune
from app.errors import ConfigurationError, TooManyRequestsError
from app.files.store import PgAttachmentStore
from app.pg.admission import PendingAdmission, pending_admission
from app.pg.engine import create_engine
from app.pg.limits import Limits
from app.pg.pool import ConnectionPool, open_pool
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.files import test_attachments as attachments_suite

# Fixtures the re-run attachment tests need (their ``store`` is this module's).
from tests.files.test_attachments import attachments, client, clock, server, settings  # noqa: F401
from tests.harness import factories as f
from tests.harness.pg import PgServer
from tests.pg import test_store as store_suite

TABLES = (
    "chatkit_threads",
    "chatkit_items",
    "chatkit_attachments",
    "chatkit_attachment_blobs",
    "chatkit_feedback",
    # app.pg.limits: kept per user like the rest.
    "chatkit_rate_limits",
    "chatkit_stream_leases",
)
CONTENT_TABLES = TABLES[:5]
ALICE = {"user_id": "alice"}
BOB = {"user_id": "bob"}
PLAN_MODES = ("force_custom_plan", "force_generic_plan")


# --- the role, its engines and stores -----------------------------------------------------


@pytest.fixture(scope="module")
async def app_role_url(database_url: str) -> AsyncIterator[str]:
    """URL of the test database as a fresh LOGIN role that does not bypass row-level security,
    with the rights docs/rls.md grants the app's role."""
    role = f"ckpg_app_{secrets.token_hex(6)}"
    password = secrets.token_urlsafe(18)  # [A-Za-z0-9_-]: safe in a literal
    admin = await asyncpg.connect(PgServer.dsn(database_url))
    try:
        await admin.execute(
            f"CREATE ROLE {role} LOGIN PASSWORD '{password}' "
            "NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
        )
        await admin.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        await admin.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(TABLES)} TO {role}"
        )
        await admin.execute(f"GRANT SELECT ON alembic_version TO {role}")
        url = make_url(database_url).set(username=role, password=password)
        yield url.render_as_string(hide_password=False)
    finally:
        # Role names are cluster-wide: nothing of it may survive the run.
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await admin.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def _app_pool(url: str, config: Settings, plan_mode: str | None = None) -> ConnectionPool:
    """The app's own pool (app.pg.pool), optionally pinned to one plan-cache mode."""
    return await open_pool(
        url, config, session={"plan_cache_mode": plan_mode} if plan_mode else None
    )


@pytest.fixture(scope="module", params=PLAN_MODES, ids=["custom", "generic"])
async def rls_pool(
    request: pytest.FixtureRequest, app_role_url: str, test_settings: Settings
) -> AsyncIterator[ConnectionPool]:
    pool = await _app_pool(app_role_url, test_settings, request.param)
    yield pool
    await pool.close()


async def _truncate(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")


@pytest.fixture
async def store(rls_pool: ConnectionPool, engine: AsyncEngine) -> AsyncIterator[PostgresStore]:
    """Overrides conftest's ``store`` for this module: the app's role, subject to the policy.
    The owner's ``engine`` empties the tables afterwards."""
    yield PostgresStore(rls_pool)
    await _truncate(engine)


@pytest.fixture
async def pooled_store(
    app_role_url: str, test_settings: Settings, engine: AsyncEngine
) -> AsyncIterator[PostgresStore]:
    """A store on the app's engine with a pool of one connection, in the default plan mode:
    every call, and every raw statement below, runs on the same server session."""
    one = test_settings.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0})
    app_pool = await _app_pool(app_role_url, one)
    yield PostgresStore(app_pool)
    await app_pool.close()
    await _truncate(engine)


# --- (a) the store and attachment contracts, through the role ------------------------------

# Not run again: no database involved, or a check that needs the owner's view (the deep-page
# test bulk-loads through the store's connection; the cascade test counts through it), or one
# of the one-node pool's own settings (this module pins the plan-cache mode; Citus keeps its
# default, tests/citus/test_citus.py). Their row-level security versions are below.
NOT_RERUN = {
    "test_generated_ids_keep_prefixes_and_entropy",
    "test_deep_page_uses_index_range_scan",
    "test_delete_thread_cascades",
    "test_the_pools_sessions_plan_generically",
}


def _rerun(suite: ModuleType) -> list[str]:
    names = []
    for name, fn in vars(suite).items():
        if (
            name.startswith("test_")
            and inspect.iscoroutinefunction(fn)
            and fn.__module__ == suite.__name__
            and name not in NOT_RERUN
        ):
            assert name not in globals(), f"{name} would shadow a test of this module"
            globals()[name] = fn
            names.append(name)
    return names


RERUN = _rerun(store_suite) + _rerun(attachments_suite)


def test_the_contract_suites_are_rerun_here() -> None:
    assert len(RERUN) > 40, RERUN
    assert "test_other_users_objects_look_missing" in RERUN
    assert "test_another_user_is_refused_in_every_operation" in RERUN


async def test_role_is_subject_to_row_level_security(
    store: PostgresStore, pool: ConnectionPool
) -> None:
    assert await store.row_security_enforced()
    assert not await PostgresStore(pool).row_security_enforced()  # the owner bypasses it


async def test_two_users_every_operation_with_cascades(
    store: PostgresStore, engine: AsyncEngine, test_settings: Settings
) -> None:
    files = PgAttachmentStore(store, test_settings)
    made: dict[str, dict[str, Any]] = {}
    for ctx in (ALICE, BOB):
        user = ctx["user_id"]
        thread = f.thread(title=f"{user}'s")
        await store.save_thread(thread, ctx)
        items = [
            f.user_message(thread.id, f"{user} {i}", f.T0 + timedelta(seconds=i)) for i in range(7)
        ]
        for item in items:
            await store.add_thread_item(thread.id, item, ctx)
        att = f.file_attachment(thread.id)
        await store.save_attachment(att, ctx)
        pending = await files.create_attachment(
            AttachmentCreateParams(name="n.txt", size=5, mime_type="text/plain"), ctx
        )
        await files.upload_to(user, pending.id, _body(b"hello"), "text/plain")
        await store.save_feedback(thread.id, [items[0].id, items[1].id], "positive", ctx)
        made[user] = {"thread": thread, "items": items, "att": att, "upload": pending.id}

    for ctx in (ALICE, BOB):
        user, mine = ctx["user_id"], made[ctx["user_id"]]
        thread, items = mine["thread"], mine["items"]
        assert await store.load_thread(thread.id, ctx) == thread
        assert [t.id for t in (await store.load_threads(10, None, "desc", ctx)).data] == [thread.id]
        for order in ("asc", "desc"):
            expected = items if order == "asc" else list(reversed(items))
            got, after = [], None
            while True:
                page = await store.load_thread_items(thread.id, after, 3, order, ctx)
                got += page.data
                if not page.has_more:
                    break
                after = page.after
            assert got == expected
        assert await store.load_item(thread.id, items[3].id, ctx) == items[3]
        assert await store.load_attachment(mine["att"].id, ctx) == mine["att"]
        info, data = await files.read_bytes(user, mine["upload"])
        assert (info.size, data) == (5, b"hello")
        assert await store.load_feedback(thread.id, ctx) == {
            items[0].id: "positive",
            items[1].id: "positive",
        }
        other = made["bob" if user == "alice" else "alice"]
        with pytest.raises(NotFoundError):
            await store.load_thread(other["thread"].id, ctx)
        with pytest.raises(NotFoundError):
            await files.file_info(user, other["upload"])

    # deletes, each cascading, for alice only: bob keeps everything
    alice = made["alice"]
    await store.delete_thread_item(alice["thread"].id, alice["items"][0].id, ALICE)
    assert await store.load_feedback(alice["thread"].id, ALICE) == {
        alice["items"][1].id: "positive"
    }
    await files.delete_attachment(alice["upload"], ALICE)
    await store.delete_attachment(alice["upload"], ALICE)
    await store.delete_thread(alice["thread"].id, ALICE)
    await store.delete_thread(alice["thread"].id, ALICE)  # idempotent: a no-op
    with pytest.raises(NotFoundError):
        await store.load_thread(alice["thread"].id, ALICE)
    owner = await _counts_by_user(engine)
    assert owner == {
        "chatkit_threads": {"bob": 1},
        "chatkit_items": {"bob": 7},
        "chatkit_attachments": {"bob": 2},
        "chatkit_attachment_blobs": {"bob": 1},
        "chatkit_feedback": {"bob": 2},
    }


async def test_pages_folded_with_the_rate_limit(store: PostgresStore) -> None:
    """app.pg.admission's folded pages, through the role: the same pages as without, the budget
    counted (the limiter's row is subject to the policy too), a refusal with Retry-After."""
    thread = f.thread()
    await store.save_thread(thread, ALICE)
    for n in range(5):
        item = f.user_message(thread.id, f"m{n}", f.T0 + timedelta(seconds=n))
        await store.add_thread_item(thread.id, item, ALICE)

    async def admitted(admission: PendingAdmission | None, call: Any) -> Any:
        token = pending_admission.set(admission and replace(admission, consumed=False))
        try:
            return await call
        finally:
            pending_admission.reset(token)

    async def pages(admission: PendingAdmission | None) -> list[Any]:
        out = [await admitted(admission, store.load_threads(5, None, "desc", ALICE))]
        for order in ("asc", "desc"):
            after = None
            while True:
                call = store.load_thread_items(thread.id, after, 2, order, ALICE)
                out.append(page := await admitted(admission, call))
                if not page.has_more:
                    break
                after = page.after
        return out

    assert await pages(PendingAdmission("alice", 0.001, 60.0)) == await pages(None)
    strict = PendingAdmission("bob", 30.0, 60.0)  # a budget of two
    for _ in range(2):
        await admitted(strict, store.load_threads(5, None, "desc", BOB))
    with pytest.raises(TooManyRequestsError) as refused:
        await admitted(strict, store.load_thread_items(thread.id, None, 2, "asc", BOB))
    assert 1 <= refused.value.retry_after <= 30


async def _body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _counts_by_user(
    engine: AsyncEngine, tables: tuple[str, ...] = CONTENT_TABLES
) -> dict[str, dict[str, int]]:
    """What the owner (no row-level security) sees: rows per user in every table."""
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        out: dict[str, dict[str, int]] = {}
        for table in tables:
            rows = await raw.fetch(f"SELECT user_id, count(*) FROM {table} GROUP BY user_id")
            out[table] = {r[0]: r[1] for r in rows}
    return out


# --- (b) unscoped reads through the app's own connections ----------------------------------


async def _seed_two_users(store: PostgresStore, config: Settings) -> None:
    files = PgAttachmentStore(store, config)
    for ctx in (ALICE, BOB):
        thread = f.thread()
        await store.save_thread(thread, ctx)
        items = [f.user_message(thread.id, "x"), f.user_message(thread.id, "y")]
        for item in items:
            await store.add_thread_item(thread.id, item, ctx)
        await store.save_feedback(thread.id, [items[0].id], "negative", ctx)
        pending = await files.create_attachment(
            AttachmentCreateParams(name="n.txt", size=2, mime_type="text/plain"), ctx
        )
        await files.upload_to(ctx["user_id"], pending.id, _body(b"hi"), "text/plain")
        # app.pg.limits' rows: a request counted, a stream lease taken (never released here).
        limits = Limits(
            store, config.model_copy(update={"rate_limit_per_minute": 60}), TaskRegistry()
        )
        await limits.admit(ctx["user_id"])
        await limits.lease(ctx["user_id"], thread.id)


async def test_unscoped_select_sees_only_the_user_set_and_nothing_without(
    pooled_store: PostgresStore, engine: AsyncEngine, test_settings: Settings
) -> None:
    store = pooled_store
    await _seed_two_users(store, test_settings)
    everything = await _counts_by_user(engine, TABLES)
    assert all(set(by_user) == {"alice", "bob"} for by_user in everything.values())

    async with store.connection() as conn:
        for user in ("alice", "bob"):
            # a store-style transaction: the setting is local to it
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.user_id', $1, true)", user)
                for table in TABLES:
                    owners = [r[0] for r in await conn.fetch(f"SELECT user_id FROM {table}")]
                    assert owners and set(owners) == {user}, table
                    assert len(owners) == everything[table][user], table
        # no user set: outside a transaction, inside one, and with an empty setting
        for table in TABLES:
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
        async with conn.transaction():
            for table in TABLES:
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.user_id', '', true)")
            for table in TABLES:
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table


async def test_the_setting_never_outlives_the_statement_that_made_it(
    pooled_store: PostgresStore, test_settings: Settings
) -> None:
    """The store's statements leave nothing on the pooled session for the next borrower."""
    store = pooled_store
    await _seed_two_users(store, test_settings)
    async with store.connection() as conn:
        pid = conn.get_server_pid()
    [thread] = (await store.load_threads(5, None, "desc", ALICE)).data
    calls: list[Callable[[], Any]] = [
        lambda: store.load_thread(thread.id, ALICE),
        lambda: store.load_thread_items(thread.id, None, 10, "asc", ALICE),
        lambda: store.load_feedback(thread.id, ALICE),
        lambda: store.save_thread(thread, ALICE),
        lambda: store.delete_thread_item(thread.id, "msg_missing", ALICE),
    ]
    for call in calls:
        await call()
        async with store.connection() as conn:
            assert conn.get_server_pid() == pid  # the very session the call used
            assert await conn.fetchval("SELECT current_setting('app.user_id', true)") in ("", None)
            for table in TABLES:
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table


# --- (c) WITH CHECK ---------------------------------------------------------------------------


async def test_writes_for_another_user_are_refused(
    pooled_store: PostgresStore, engine: AsyncEngine
) -> None:
    store = pooled_store
    thread = f.thread()
    await store.save_thread(thread, ALICE)
    row = (thread.id + "_x", datetime.now(UTC), "{}")
    refused = [
        # alice set, a row for bob
        ("alice", "INSERT INTO chatkit_threads (user_id, id, created_at, data) "
         "VALUES ('bob', $1, $2, $3::jsonb)", row),
        # the store's own shape, with bob's id smuggled in as the value
        ("alice", "INSERT INTO chatkit_threads (user_id, id, created_at, data) "
         "SELECT 'bob', $1, $2, $3::jsonb FROM (SELECT set_config('app.user_id', 'alice', true)) s",
         row),
        # moving alice's row to bob
        ("alice", "UPDATE chatkit_threads SET user_id = 'bob' WHERE id = $1", (thread.id,)),
        # no user set at all
        (None, "INSERT INTO chatkit_threads (user_id, id, created_at, data) "
         "VALUES ('alice', $1, $2, $3::jsonb)", row),
        # bytes for bob's attachment while alice is set
        ("alice", "INSERT INTO chatkit_attachment_blobs (user_id, attachment_id, chunk_no, data) "
         "VALUES ('bob', 'atc_x', 0, '\\x00')", ()),
    ]  # fmt: skip
    async with store.connection() as conn:
        for user, sql, args in refused:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                async with conn.transaction():
                    if user is not None:
                        await conn.execute("SELECT set_config('app.user_id', $1, true)", user)
                    await conn.execute(sql, *args)
        # and a write for the user that is set goes through
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.user_id', 'alice', true)")
            await conn.execute("UPDATE chatkit_threads SET title = 'ok' WHERE id = $1", thread.id)
    assert await _counts_by_user(engine) == {
        "chatkit_threads": {"alice": 1},
        "chatkit_items": {},
        "chatkit_attachments": {},
        "chatkit_attachment_blobs": {},
        "chatkit_feedback": {},
    }
    assert (await store.load_thread(thread.id, ALICE)).id == thread.id


# --- migration, owner, prune ----------------------------------------------------------------


async def test_every_table_has_the_policy_and_is_not_forced(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        flags = await raw.fetch(
            "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
            "WHERE relname = ANY($1::text[]) AND relkind = 'r'",
            list(TABLES),
        )
        policies = await raw.fetch(
            "SELECT tablename, cmd, permissive, roles, qual, with_check FROM pg_policies "
            "WHERE tablename LIKE 'chatkit\\_%'"
        )
    assert {r[0]: (r[1], r[2]) for r in flags} == {t: (True, False) for t in TABLES}
    expected = "(user_id = current_setting('app.user_id'::text, true))"
    assert sorted(r[0] for r in policies) == sorted(TABLES)
    for r in policies:
        assert (r[1], r[2], r[3], r[4], r[5]) == (
            "ALL",
            "PERMISSIVE",
            ["public"],
            expected,
            expected,
        )


async def test_prune_refuses_the_app_role_and_runs_as_owner(
    app_role_url: str, engine: AsyncEngine, test_settings: Settings
) -> None:
    as_app = create_engine(app_role_url, test_settings)
    try:
        with pytest.raises(ConfigurationError, match="owner"):
            await prune(as_app, test_settings, dry_run=True)
    finally:
        await as_app.dispose()
    report = await prune(engine, test_settings, dry_run=True)
    assert report.orphan_attachments == 0


# --- (ordering) the plan of every statement ---------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _statements() -> dict[str, tuple[str, tuple[Any, ...]]]:
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


def _folded_statements() -> dict[str, tuple[str, tuple[Any, ...]]]:
    """The pages folded with the limiter's upsert (app.pg.admission), with sample arguments.

    Not among ``_statements()``: they never run on a Citus cluster (tests/citus/test_citus.py)."""
    assert {f.name for f in fields(store_sql._PageSQL)} == {
        "first",
        "after",
        "exists",
        "first_admitted",
        "after_admitted",
    }, "a new page statement: check its plan here or in _statements()"
    u, t, i = "alice", "thr_plan", "msg_plan_1"
    out: dict[str, tuple[str, tuple[Any, ...]]] = {}
    for order in ("asc", "desc"):
        for kind, pages, scope, cursor in (
            ("threads", store_sql._THREAD_PAGES, (u,), t),
            ("items", store_sql._ITEM_PAGES, (u, t), i),
        ):
            sqls = pages[order]  # type: ignore[index]
            out[f"{kind} page {order} first admitted"] = (
                sqls.first_admitted,
                (*scope, 21, 0.5, 60.0),
            )
            out[f"{kind} page {order} after admitted"] = (
                sqls.after_admitted,
                (*scope, cursor, 21, 0.5, 60.0),
            )
    return out


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _walk(child)


def _own_text(node: dict[str, Any]) -> str:
    """A node's own expressions, without its children's."""
    return json.dumps({k: v for k, v in node.items() if k != "Plans"})


def _reads_a_table(node: dict[str, Any]) -> bool:
    return "Scan" in node["Node Type"] and (
        str(node.get("Relation Name", "")).startswith("chatkit_") or "Index Name" in node
    )


def _outside(root: dict[str, Any], subtree: dict[str, Any]) -> list[dict[str, Any]]:
    inside = {id(n) for n in _walk(subtree)}
    return [n for n in _walk(root) if id(n) not in inside]


def _init_ref(init: dict[str, Any]) -> str:
    """How the plan refers to an InitPlan's value."""
    name = init["Subplan Name"]  # "InitPlan 1 (returns $0)" up to 16, "InitPlan 1" from 17
    m = re.search(r"returns (\$\d+)", name)
    return m.group(1) if m else f"({name}).col1"


def _check_folded(root: dict[str, Any]) -> None:
    """A page folded with the limiter's upsert: the upsert, a CTE, has the INSERT shape; the
    rest has the SELECT shape, and its gate lies below a One-Time Filter testing whether the
    upsert admitted the request, so a refused request reads no page."""
    [cte] = [n for n in root.get("Plans", []) if n.get("Subplan Name") == "CTE a"]
    _check_plan("INSERT", cte)
    rest = {**root, "Plans": [n for n in root["Plans"] if n is not cte]}
    _check_plan("SELECT", rest)
    admitted = [
        _init_ref(n)
        for n in _walk(rest)
        if n.get("Parent Relationship") == "InitPlan" and n.get("CTE Name") == "a"
    ]
    [check] = [n for n in _walk(rest) if n.get("One-Time Filter") in admitted]
    assert check["Node Type"] == "Result"
    assert any("set_config" in _own_text(n) for n in _walk(check))
    assert all(id(n) in {id(m) for m in _walk(check)} for n in _walk(rest) if _reads_a_table(n))


def _check_plan(kind: str, root: dict[str, Any]) -> None:
    """The ordering argument of app.pg.store, on one plan."""
    if kind == "WITH":
        _check_folded(root)
        return
    nodes = list(_walk(root))
    if kind == "INSERT":
        # Every inserted row carries set_config's result; no table is read first.
        assert root["Node Type"] == "ModifyTable" and root["Operation"] == "Insert"
        assert not any(_reads_a_table(n) for n in nodes)
        assert any("set_config" in _own_text(n) for n in nodes)
        assert not any("current_setting" in _own_text(n) for n in nodes)
        return
    # The gate: an InitPlan calling set_config, tested by a Result's One-Time Filter, which a
    # Result evaluates before it runs its child at all; every scan is below that Result.
    inits = [n for n in nodes if n.get("Parent Relationship") == "InitPlan"]
    [init] = [n for n in inits if "set_config" in json.dumps(n)]
    ref = _init_ref(init)
    gate_test = f"({ref} IS NOT NULL)"
    gates = [n for n in nodes if "One-Time Filter" in n and ref in n["One-Time Filter"]]
    assert len(gates) == 1, gates
    [gate] = gates
    first = gate["One-Time Filter"]
    below = {id(n) for n in _walk(gate)}
    assert all(id(n) in below for n in nodes if _reads_a_table(n))
    assert any(_reads_a_table(n) for n in _walk(gate))
    outside = _outside(root, gate)
    assert not any("current_setting" in _own_text(n) for n in outside if n is not init)
    if kind == "SELECT":
        # The query is fenced below the gate: the gate is the whole filter, and the check
        # PostgreSQL derives from the policy is evaluated further down, after it.
        assert first == gate_test, first
        assert gate["Node Type"] == "Result"
        return
    # UPDATE and DELETE: the derived check shares the filter; the gate must come first.
    assert kind in ("UPDATE", "DELETE"), kind
    assert root["Node Type"] == "ModifyTable" and root["Operation"] == kind.title()
    assert first == gate_test or first.startswith(f"({gate_test} AND "), first


async def _literal(conn: asyncpg.Connection, value: Any) -> str:
    if isinstance(value, int | float):
        return str(value)
    cast = {list: "text[]", bytes: "bytea", datetime: "timestamptz"}.get(type(value), "text")
    literal: str = await conn.fetchval(f"SELECT quote_nullable($1::{cast})", value)
    return literal


@pytest.fixture
async def plan_data(engine: AsyncEngine) -> AsyncIterator[None]:
    """A few hundred rows of two users (written by the owner), so plans are realistic."""
    async with engine.connect() as sa:
        raw = (await sa.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.execute(
            "INSERT INTO chatkit_threads (user_id, id, created_at, data) "
            "SELECT u, 'thr_plan' || CASE WHEN g = 0 THEN '' ELSE g::text END, "
            "now() - g * interval '1 s', '{}' FROM generate_series(0, 200) g, "
            "unnest(ARRAY['alice', 'bob']) u"
        )
        await raw.execute(
            "INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data) "
            "SELECT u, 'thr_plan', 'msg_plan_' || g, now() - g * interval '1 ms', 'user_message', "
            "'{}' FROM generate_series(1, 500) g, unnest(ARRAY['alice', 'bob']) u"
        )
        await raw.execute(
            "INSERT INTO chatkit_attachments (user_id, id, thread_id, data, status) "
            "SELECT u, 'atc_plan' || CASE WHEN g = 0 THEN '' ELSE g::text END, NULL, '{}', "
            "'ready' FROM generate_series(0, 100) g, unnest(ARRAY['alice', 'bob']) u"
        )
        await raw.execute(
            "INSERT INTO chatkit_attachment_blobs SELECT user_id, id, c, '\\x00' "
            "FROM chatkit_attachments, generate_series(0, 3) c"
        )
        await raw.execute(
            "INSERT INTO chatkit_feedback (user_id, thread_id, item_id, kind) "
            "SELECT user_id, thread_id, id, 'positive' FROM chatkit_items"
        )
        await raw.execute("ANALYZE")
    yield
    await _truncate(engine)


@pytest.mark.parametrize("plan_mode", PLAN_MODES, ids=["custom", "generic"])
async def test_every_statement_sets_the_user_before_reading_a_table(
    plan_data: None, app_role_url: str, plan_mode: str
) -> None:
    conn = await asyncpg.connect(PgServer.dsn(app_role_url))
    try:
        await conn.execute(f"SET plan_cache_mode = {plan_mode}")
        checked = []
        statements = {**_statements(), **_folded_statements()}
        for name, (sql, args) in statements.items():
            literals = [await _literal(conn, a) for a in args]
            await conn.execute(f"PREPARE rls_check AS {sql}")
            try:
                # A prepared statement, EXECUTEd: the plan cache applies plan_cache_mode.
                explained = await conn.fetchval(
                    f"EXPLAIN (VERBOSE, FORMAT JSON) EXECUTE rls_check({', '.join(literals)})"
                )
            finally:
                await conn.execute("DEALLOCATE rls_check")
            root = json.loads(explained)[0]["Plan"]
            try:
                _check_plan(sql.split(None, 1)[0].upper(), root)
            except AssertionError as exc:
                raise AssertionError(f"{name} ({plan_mode}): {exc}\n{explained}") from exc
            checked.append(name)
        assert len(checked) == len(statements)
    finally:
        await conn.close()


@pytest.mark.parametrize("plan_mode", PLAN_MODES, ids=["custom", "generic"])
async def test_deep_page_is_an_index_range_scan_under_the_policy(
    engine: AsyncEngine, app_role_url: str, plan_mode: str
) -> None:
    """tests/pg/test_store.py's deep-page check, as the app's role: the page after item 10,000 of
    a 20,000-item thread reads the page (plus one) from the index, not the rows before it."""
    tid = "thr_deep"
    async with engine.connect() as sa:
        raw = (await sa.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.execute(
            "INSERT INTO chatkit_threads (user_id, id, created_at, data) "
            "VALUES ('alice', $1, now(), '{}')",
            tid,
        )
        await raw.execute(
            "INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data) "
            "SELECT 'alice', $1, 'msg_' || g, $2::timestamptz + g * interval '1 ms', "
            "'user_message', '{}'::jsonb FROM generate_series(1, 20000) g",
            tid,
            datetime(2026, 1, 1, tzinfo=UTC),
        )
        await raw.execute("ANALYZE chatkit_items")
    conn = await asyncpg.connect(PgServer.dsn(app_role_url))
    index = "ix_chatkit_items_user_id_thread_id_created_at_seq"
    try:
        await conn.execute(f"SET plan_cache_mode = {plan_mode}")
        for order in ("asc", "desc"):
            sql = store_sql._ITEM_PAGES[order].after  # type: ignore[index]
            await conn.execute(f"PREPARE deep AS {sql}")
            try:
                plan = json.loads(
                    await conn.fetchval(
                        "EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON) "
                        "EXECUTE deep('alice', 'thr_deep', 'msg_10000', 21)"
                    )
                )
            finally:
                await conn.execute("DEALLOCATE deep")
            root = plan[0]["Plan"]
            _check_plan("SELECT", root)
            nodes = list(_walk(root))
            scans = [n for n in nodes if n.get("Index Name") == index]
            assert scans, plan
            assert all(n["Actual Rows"] * n["Actual Loops"] <= 21 for n in scans), plan
            assert root["Actual Rows"] == 21, plan  # the page really is there, under the policy
            sorts = [n for n in nodes if n["Node Type"] == "Sort"]
            assert all(n["Actual Rows"] <= 21 for n in sorts), plan
            assert not any(n["Node Type"] == "Seq Scan" for n in nodes), plan
    finally:
        await conn.close()
        await _truncate(engine)


# --- the service says which wall it runs behind -------------------------------------------------


@pytest.mark.parametrize("as_app_role", [False, True], ids=["owner", "app-role"])
async def test_first_readiness_check_reports_row_security(
    as_app_role: bool,
    app_role_url: str,
    database_url: str,
    app_settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import httpx

    from app.main import create_app

    url = app_role_url if as_app_role else database_url
    app = create_app(app_settings.model_copy(update={"database_url": url}))
    caplog.set_level(logging.INFO, logger="app.http.health")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for _ in range(3):
                assert (await http.get("/readyz")).status_code == 200
    said = [r for r in caplog.records if "row-level security" in r.getMessage()]
    assert len(said) == 1  # once per process, not per probe
    assert app.state.runtime.row_security is as_app_role
    if as_app_role:
        assert said[0].levelno == logging.INFO and "enforced" in said[0].getMessage()
    else:
        assert said[0].levelno == logging.WARNING and "bypassed" in said[0].getMessage()
