"""Row-level security (migration 0003): PostgreSQL's own wall behind the store's ``user_id`` filters.

The app connects as a role without BYPASSRLS, and every statement of the store and of the
attachment store sets ``app.user_id`` for its own transaction (app.pg.store explains the statement
shapes that make PostgreSQL set it before reading any chatkit_ table). This module creates such a
role on the test server (random name, dropped at the end: tests/conftest.py's ``app_role_url``)
and proves:

* the whole store and attachment contract holds through it, with custom and with generic plans:
  tests/pg/test_store.py and tests/files/test_attachments.py name the ``role-custom`` and
  ``role-generic`` backends (tests/harness/backends.py), where the ``store`` fixture is a
  PostgresStore connecting as that role (their raw-SQL checks use the owner's ``engine``, which
  bypasses row-level security and so sees every row);
* the plan of every statement makes the setting before it reads a table, custom and generic, and
  the keyset page stays an index range scan under the policy;
* a deliberately unscoped SELECT on the app's own pooled connection sees only the current user's
  rows, none with no user set, and the setting never outlives the statement that made it;
* a row written for another user than the one set is refused (WITH CHECK).

A misordered statement could never show another user's rows (the store's own filter still
applies); it would see *no* rows, which the contract tests would catch as missing data.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from chatkit.store import NotFoundError
from chatkit.types import AttachmentCreateParams
from sqlalchemy.ext.asyncio import AsyncEngine

import app.pg.store as store_sql
from app.cli.prune import prune
from app.context import RequestContext
from app.errors import ConfigurationError, TooManyRequestsError
from app.files.store import PgAttachmentStore
from app.pg.admission import PendingAdmission
from app.pg.engine import create_engine
from app.pg.pool import ConnectionPool
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness import factories as f
from tests.harness.backends import ROLE_TABLES, empty_tables
from tests.harness.pg import PgServer
from tests.harness.rls import ALICE, BOB, body, counts_by_user, seed_two_users
from tests.harness.statements import literal, statements

TABLES = ROLE_TABLES
PLAN_MODES = ("force_custom_plan", "force_generic_plan")

# The app's role on one node (tests/conftest.py: ``app_role_url``, ``store``, ``pooled_store``).
pytestmark = pytest.mark.backends("role")
# Through the role's store, with custom and with generic plans.
BOTH_PLANS = pytest.mark.backends("role-custom", "role-generic")
# Tests that hold on any PostgreSQL: on a Citus cluster too (tests/citus/test_citus_rls.py has
# what only a cluster shows).
ANY_SERVER_BOTH_PLANS = pytest.mark.backends("role-custom", "role-generic", "citus-role")
ANY_SERVER = pytest.mark.backends("role", "citus-role")


@ANY_SERVER_BOTH_PLANS
async def test_role_is_subject_to_row_level_security(
    store: PostgresStore, pool: ConnectionPool
) -> None:
    assert await store.row_security_enforced()
    assert not await PostgresStore(pool).row_security_enforced()  # the owner bypasses it


@ANY_SERVER_BOTH_PLANS
async def test_two_users_every_operation_with_cascades(
    store: PostgresStore, engine: AsyncEngine, test_settings: Settings
) -> None:
    files = PgAttachmentStore(store.pool, store, test_settings)
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
        await files.upload_to(user, pending.id, body(b"hello"), "text/plain")
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
    owner = await counts_by_user(engine)
    assert owner == {
        "chatkit_threads": {"bob": 1},
        "chatkit_items": {"bob": 7},
        "chatkit_attachments": {"bob": 2},
        "chatkit_attachment_blobs": {"bob": 1},
        "chatkit_feedback": {"bob": 2},
    }


@BOTH_PLANS
async def test_pages_folded_with_the_rate_limit(store: PostgresStore) -> None:
    """app.pg.admission's folded pages, through the role: the same pages as without, the budget
    counted (the limiter's row is subject to the policy too), a refusal with Retry-After."""
    thread = f.thread()
    await store.save_thread(thread, ALICE)
    for n in range(5):
        item = f.user_message(thread.id, f"m{n}", f.T0 + timedelta(seconds=n))
        await store.add_thread_item(thread.id, item, ALICE)

    def admitted(admission: PendingAdmission | None, user: str = "alice") -> RequestContext:
        """The context the endpoint hands the store, with a fresh copy of ``admission``."""
        return RequestContext(user, page_fold=admission and replace(admission, consumed=False))

    async def pages(admission: PendingAdmission | None) -> list[Any]:
        out = [await store.load_threads(5, None, "desc", admitted(admission))]
        for order in ("asc", "desc"):
            after = None
            while True:
                ctx = admitted(admission)
                out.append(page := await store.load_thread_items(thread.id, after, 2, order, ctx))
                if not page.has_more:
                    break
                after = page.after
        return out

    assert await pages(PendingAdmission("alice", 0.001, 60.0)) == await pages(None)
    strict = PendingAdmission("bob", 30.0, 60.0)  # a budget of two
    for _ in range(2):
        await store.load_threads(5, None, "desc", admitted(strict, "bob"))
    with pytest.raises(TooManyRequestsError) as refused:
        await store.load_thread_items(thread.id, None, 2, "asc", admitted(strict, "bob"))
    assert 1 <= refused.value.retry_after <= 30


# --- (b) unscoped reads through the app's own connections ----------------------------------


async def test_unscoped_select_sees_only_the_user_set_and_nothing_without(
    pooled_store: PostgresStore, engine: AsyncEngine, test_settings: Settings
) -> None:
    store = pooled_store
    await seed_two_users(store, test_settings)
    everything = await counts_by_user(engine, TABLES)
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


@ANY_SERVER
async def test_the_setting_never_outlives_the_statement_that_made_it(
    pooled_store: PostgresStore, test_settings: Settings
) -> None:
    """The store's statements leave nothing on the pooled session for the next borrower."""
    store = pooled_store
    await seed_two_users(store, test_settings)
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
    assert await counts_by_user(engine) == {
        "chatkit_threads": {"alice": 1},
        "chatkit_items": {},
        "chatkit_attachments": {},
        "chatkit_attachment_blobs": {},
        "chatkit_feedback": {},
    }
    assert (await store.load_thread(thread.id, ALICE)).id == thread.id


# --- migration, owner, prune ----------------------------------------------------------------


@ANY_SERVER
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


@ANY_SERVER
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


def _folded_statements() -> dict[str, tuple[str, tuple[Any, ...]]]:
    """The pages folded with the limiter's upsert (app.pg.admission), with sample arguments.

    Not among ``statements()``: they never run on a Citus cluster (tests/citus/test_citus.py)."""
    assert {f.name for f in fields(store_sql._PageSQL)} == {
        "first",
        "after",
        "exists",
        "first_admitted",
        "after_admitted",
    }, "a new page statement: check its plan here or in statements()"
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
    await empty_tables(engine, "role")


@pytest.mark.parametrize("plan_mode", PLAN_MODES, ids=["custom", "generic"])
async def test_every_statement_sets_the_user_before_reading_a_table(
    plan_data: None, app_role_url: str, plan_mode: str
) -> None:
    conn = await asyncpg.connect(PgServer.dsn(app_role_url))
    try:
        await conn.execute(f"SET plan_cache_mode = {plan_mode}")
        checked = []
        every = {**statements(), **_folded_statements()}
        for name, (sql, args) in every.items():
            literals = [await literal(conn, a) for a in args]
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
        assert len(checked) == len(every)
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
        await empty_tables(engine, "role")


# --- the service says which wall it runs behind -------------------------------------------------


@ANY_SERVER
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
