"""Plugins over /chatkit with the example task-list plugin (examples/plugin_tasks): its tool
streams a widget that is stored, its streaming and sync actions update PostgreSQL and replace the
widget (and the replacement is stored), actions are refused like the rest of the API (another
user's widget is a missing thread, unknown types and rejected payloads are 400s), and a bad
CHATKIT_PLUGINS entry stops startup with one line."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from agents.testing import ScriptedModel, assistant_message, function_call
from alembic import command
from chatkit.types import WidgetItem
from sqlalchemy.engine import make_url

from app.chat.plugins import Plugin, UserDatabase, load_plugins
from app.cli.commands import alembic_config
from app.errors import ConfigurationError
from app.pg.pool import ConnectionPool, open_pool
from app.pg.store import PostgresStore
from app.settings import PROJECT_ROOT, Settings
from tests.conftest import TABLES, MakeClient
from tests.harness.chatkit_client import ChatKitClient, done_items, of_type
from tests.harness.pg import PgServer

PLUGIN = "examples.plugin_tasks.plugin:plugin"
ALICE = {"user_id": "alice"}
ACTION_KEYS = ("type", "payload", "streaming")


@pytest.fixture(scope="module")
async def plugin_db(pg_server: PgServer) -> AsyncIterator[str]:
    """A database migrated by the app's migrate path with the plugin's branch."""
    url = await pg_server.create_database("ckpg_plugins")
    cfg = alembic_config(url, load_plugins([PLUGIN]).migration_locations)
    cfg.attributes["skip_logging_config"] = True
    await asyncio.to_thread(command.upgrade, cfg, "heads")
    yield url
    await pg_server.drop_database(url)


@pytest.fixture(scope="module")
async def plugin_pool(plugin_db: str, test_settings: Settings) -> AsyncIterator[ConnectionPool]:
    pool = await open_pool(plugin_db, test_settings)
    yield pool
    await pool.close()


@pytest.fixture
async def pstore(plugin_pool: ConnectionPool) -> AsyncIterator[PostgresStore]:
    """The plugin database's store; its tables are emptied after each test."""
    store = PostgresStore(plugin_pool)
    yield store
    async with store.connection() as conn:
        await conn.execute(f"TRUNCATE {TABLES}, plugin_tasks CASCADE")


async def plugin_client(
    make_client: MakeClient, plugin_db: str, model: Any = None, **overrides: Any
) -> ChatKitClient:
    return await make_client(
        model=model, database_url=plugin_db, chatkit_plugins=[PLUGIN], **overrides
    )


async def add_tasks(store: PostgresStore, user: str, *titles: str) -> list[int]:
    db = UserDatabase(store, user)
    async with db.transaction() as conn:
        return [
            await conn.fetchval(
                "INSERT INTO plugin_tasks (user_id, title) VALUES ($1, $2) RETURNING id", user, t
            )
            for t in titles
        ]


async def done_flags(store: PostgresStore, user: str) -> dict[str, bool]:
    async with UserDatabase(store, user).transaction() as conn:
        rows = await conn.fetch("SELECT title, done FROM plugin_tasks WHERE user_id = $1", user)
    return {r["title"]: r["done"] for r in rows}


def rows_of(widget: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(title, button label, button action) of each row of the task widget."""
    out = []
    for item in widget["children"]:
        text, _, button = item["children"][0]["children"]
        click = button["onClickAction"]
        # (a stored widget reads back with the SDK's defaults filled in: handler, loadingBehavior)
        out.append((text["value"], button["label"], {k: click[k] for k in ACTION_KEYS}))
    return out


async def show_widget(client: ChatKitClient, store: PostgresStore) -> tuple[str, dict[str, Any]]:
    """alice asks for her tasks; the scripted model calls show_tasks. Returns (thread, item)."""
    thread_id, events = await client.create_thread("Show my tasks")
    (widget,) = done_items(events, "widget")
    stored = await store.load_item(thread_id, widget["id"], ALICE)
    assert isinstance(stored, WidgetItem)
    assert rows_of(stored.widget.model_dump(mode="json")) == rows_of(widget["widget"])
    return thread_id, widget


def show_tasks_model() -> ScriptedModel:
    return ScriptedModel(
        [[function_call("show_tasks", {}, call_id="call_show")], [assistant_message("Here.")]]
    )


def action(thread_id: str, item_id: str | None, type_: str, payload: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"thread_id": thread_id, "action": {"type": type_, "payload": payload}}
    if item_id is not None:
        params["item_id"] = item_id
    return params


# --- the widget and its actions --------------------------------------------------------------


async def test_tool_adds_a_task_and_shows_the_widget(
    make_client: MakeClient, plugin_db: str, pstore: PostgresStore
) -> None:
    model = ScriptedModel(
        [
            [function_call("add_task", {"title": "Buy  milk"}, call_id="call_add")],
            [assistant_message("Added.")],
        ]
    )
    client = await plugin_client(make_client, plugin_db, model)
    thread_id, events = await client.create_thread("Remind me to buy milk")

    assert await done_flags(pstore, "alice") == {"Buy milk": False}
    (widget,) = done_items(events, "widget")
    assert [(t, label) for t, label, _ in rows_of(widget["widget"])] == [("Buy milk", "Done")]
    assert widget["copy_text"] == "[ ] Buy milk"
    stored = await pstore.load_item(thread_id, widget["id"], ALICE)
    assert isinstance(stored, WidgetItem) and stored.copy_text == "[ ] Buy milk"
    # The plugin's tools and instructions reach the model.
    assert {"add_task", "show_tasks"} <= {tool.name for tool in model.calls[0].tools}
    assert "task list" in (model.calls[0].system_instructions or "")
    # Every item of the reply is in the thread, in order.
    page = await client.call("items.list", {"thread_id": thread_id, "order": "asc"})
    assert [i["type"] for i in page["data"]] == ["user_message", "widget", "assistant_message"]


async def test_streaming_action_updates_and_replaces_the_widget(
    make_client: MakeClient, plugin_db: str, pstore: PostgresStore
) -> None:
    milk, bob = await add_tasks(pstore, "alice", "Buy milk", "Call Bob")
    client = await plugin_client(make_client, plugin_db, show_tasks_model())
    thread_id, widget = await show_widget(client, pstore)
    assert rows_of(widget["widget"])[0] == (
        "Buy milk",
        "Done",
        {"type": "tasks.complete", "payload": {"task_id": milk}, "streaming": True},
    )

    events = await client.stream(
        "threads.custom_action",
        action(thread_id, widget["id"], "tasks.complete", {"task_id": milk}),
    )
    (replaced,) = of_type(events, "thread.item.replaced")
    assert replaced["item"]["id"] == widget["id"]
    assert [(t, label) for t, label, _ in rows_of(replaced["item"]["widget"])] == [
        ("Buy milk", "Undo"),
        ("Call Bob", "Done"),
    ]
    assert not of_type(events, "error")
    assert await done_flags(pstore, "alice") == {"Buy milk": True, "Call Bob": False}

    stored = await pstore.load_item(thread_id, widget["id"], ALICE)
    assert isinstance(stored, WidgetItem)
    assert rows_of(stored.widget.model_dump(mode="json")) == rows_of(replaced["item"]["widget"])
    page = await client.call("items.list", {"thread_id": thread_id, "order": "asc"})
    assert [i["type"] for i in page["data"]] == ["user_message", "widget", "assistant_message"]
    assert bob  # the second task is untouched, as checked above


async def test_sync_action_answers_with_the_new_widget_and_stores_it(
    make_client: MakeClient, plugin_db: str, pstore: PostgresStore
) -> None:
    (milk,) = await add_tasks(pstore, "alice", "Buy milk")
    client = await plugin_client(make_client, plugin_db, show_tasks_model())
    thread_id, widget = await show_widget(client, pstore)
    await client.stream(
        "threads.custom_action",
        action(thread_id, widget["id"], "tasks.complete", {"task_id": milk}),
    )

    answer = await client.call(
        "threads.sync_custom_action",
        action(thread_id, widget["id"], "tasks.reopen", {"task_id": milk}),
    )
    updated = answer["updated_item"]
    assert updated["id"] == widget["id"] and updated["type"] == "widget"
    assert [(t, label) for t, label, _ in rows_of(updated["widget"])] == [("Buy milk", "Done")]
    assert await done_flags(pstore, "alice") == {"Buy milk": False}
    stored = await pstore.load_item(thread_id, widget["id"], ALICE)
    assert isinstance(stored, WidgetItem)
    assert rows_of(stored.widget.model_dump(mode="json")) == rows_of(updated["widget"])


# --- refusals ----------------------------------------------------------------------------------


def _without_request_id(body: dict[str, Any]) -> dict[str, Any]:
    error = dict(body["error"])
    error.pop("request_id", None)
    return error


async def test_another_users_action_answers_like_a_missing_thread(
    make_client: MakeClient, plugin_db: str, pstore: PostgresStore
) -> None:
    (milk,) = await add_tasks(pstore, "alice", "Buy milk")
    client = await plugin_client(make_client, plugin_db, show_tasks_model())
    thread_id, widget = await show_widget(client, pstore)
    before = await pstore.load_item(thread_id, widget["id"], ALICE)

    for kind, type_ in (
        ("threads.custom_action", "tasks.complete"),
        ("threads.sync_custom_action", "tasks.reopen"),
    ):
        payload = {"task_id": milk}
        bobs = await client.request(
            kind, action(thread_id, widget["id"], type_, payload), user="bob"
        )
        missing = await client.request(
            kind, action("thr_missing", widget["id"], type_, payload), user="bob"
        )
        assert bobs.status_code == missing.status_code == 404
        assert bobs.headers["content-type"] == missing.headers["content-type"]
        assert _without_request_id(bobs.json()) == _without_request_id(missing.json())
        assert _without_request_id(bobs.json()) == {"code": "not_found", "message": "Not found."}

    assert await done_flags(pstore, "alice") == {"Buy milk": False}
    assert await pstore.load_item(thread_id, widget["id"], ALICE) == before


async def test_unknown_action_types_are_400_naming_nothing(
    make_client: MakeClient, plugin_db: str, pstore: PostgresStore
) -> None:
    await add_tasks(pstore, "alice", "Buy milk")
    client = await plugin_client(make_client, plugin_db, show_tasks_model())
    thread_id, widget = await show_widget(client, pstore)
    cases = [
        ("threads.custom_action", "tasks.secret_admin_thing"),
        ("threads.sync_custom_action", "tasks.secret_admin_thing"),
        # Each kind only reaches the handlers of its kind.
        ("threads.custom_action", "tasks.reopen"),
        ("threads.sync_custom_action", "tasks.complete"),
    ]
    for kind, type_ in cases:
        response = await client.request(kind, action(thread_id, widget["id"], type_, {}))
        assert response.status_code == 400, (kind, type_, response.text)
        error = response.json()["error"]
        assert error["code"] == "unsupported"
        assert error["message"] == "This server does not handle this action."
        assert "tasks" not in response.text


async def test_rejected_payloads_are_400_before_any_stream(
    make_client: MakeClient, plugin_db: str, pstore: PostgresStore
) -> None:
    (milk,) = await add_tasks(pstore, "alice", "Buy milk")
    (bobs_task,) = await add_tasks(pstore, "bob", "Bob's task")
    client = await plugin_client(make_client, plugin_db, show_tasks_model())
    thread_id, widget = await show_widget(client, pstore)
    before = await pstore.load_item(thread_id, widget["id"], ALICE)

    rejected = [
        ({}, "The action needs the id of a task."),
        ({"task_id": "milk"}, "The action needs the id of a task."),
        (None, "The action needs the id of a task."),
        # the id column's range and type, checked before SQL (a 500 once: int64 overflow)
        *(
            ({"task_id": bad}, "The action needs the id of a task.")
            for bad in (2**63, 2**64, -(2**63) - 1, 10**30, 0, -1, True, str(milk), float(milk))
        ),
        ({"task_id": milk + 1000}, "There is no such task."),
        ({"task_id": bobs_task}, "There is no such task."),  # bob's task is not alice's
    ]
    for kind, type_ in (
        ("threads.custom_action", "tasks.complete"),
        ("threads.sync_custom_action", "tasks.reopen"),
    ):
        for payload, message in rejected:
            response = await client.request(kind, action(thread_id, widget["id"], type_, payload))
            assert response.status_code == 400, (kind, payload, response.text)
            assert response.headers["content-type"] == "application/json"
            error = response.json()["error"]
            assert (error["code"], error["message"]) == ("action_rejected", message)

    assert await done_flags(pstore, "alice") == {"Buy milk": False}
    assert await done_flags(pstore, "bob") == {"Bob's task": False}
    assert await pstore.load_item(thread_id, widget["id"], ALICE) == before


async def test_actions_must_come_from_a_widget(
    make_client: MakeClient, plugin_db: str, pstore: PostgresStore
) -> None:
    (milk,) = await add_tasks(pstore, "alice", "Buy milk")
    client = await plugin_client(make_client, plugin_db, show_tasks_model())
    thread_id, _ = await show_widget(client, pstore)
    page = await client.call("items.list", {"thread_id": thread_id, "order": "asc"})
    question = page["data"][0]["id"]
    for item_id in (None, question):
        response = await client.request(
            "threads.custom_action", action(thread_id, item_id, "tasks.complete", {"task_id": milk})
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"] == "Actions can only come from a widget."
    missing = await client.request(
        "threads.custom_action", action(thread_id, "wid_missing", "tasks.complete", {})
    )
    assert missing.status_code == 404
    assert await done_flags(pstore, "alice") == {"Buy milk": False}


async def test_readiness_counts_the_plugins_migrations(
    make_client: MakeClient, plugin_db: str, pstore: PostgresStore
) -> None:
    client = await plugin_client(make_client, plugin_db)
    response = await client.http.get("/readyz")
    assert response.status_code == 200, response.text
    runtime = client.app.state.runtime
    assert "plugin_tasks_0001" in runtime.alembic_heads and len(runtime.alembic_heads) == 2


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("examples.plugin_tasks.plugin", "expected module:attribute"),
        ("examples.no_such_plugin:plugin", "cannot import examples.no_such_plugin"),
        ("examples.plugin_tasks.plugin:nothing", "nothing is a NoneType, not an app.chat.plugins"),
        ("examples.plugin_tasks.plugin:task_widget", "task_widget is a function, not an app"),
        ("app.chat.plugins:Plugin", "Plugin is a type, not an app.chat.plugins.Plugin"),
    ],
)
def test_bad_plugin_entries_are_one_line_naming_the_setting(entry: str, says: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_plugins([entry])
    message = str(info.value)
    assert message.startswith(f"CHATKIT_PLUGINS entry {entry!r}: ") and says in message
    assert "\n" not in message


def test_plugins_may_not_claim_the_same_action(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="another plugin is also named tasks"):
        load_plugins([PLUGIN, PLUGIN])
    module = tmp_path / "ckpg_dup_plugin.py"
    module.write_text(
        "from app.chat.plugins import Plugin\n"
        "async def h(ctx): return None\n"
        "plugin = Plugin(name='dup', sync_actions={'tasks.reopen': h})\n"
        "bad_name = Plugin(name='not a name')\n"
        "no_dir = Plugin(name='nodir', migrations=__import__('pathlib').Path('/nonexistent'))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigurationError, match=r"action type tasks\.reopen is handled by"):
            load_plugins([PLUGIN, "ckpg_dup_plugin:plugin"])
        with pytest.raises(ConfigurationError, match="name must be an identifier"):
            load_plugins(["ckpg_dup_plugin:bad_name"])
        with pytest.raises(ConfigurationError, match="migrations folder /nonexistent"):
            load_plugins(["ckpg_dup_plugin:no_dir"])
        assert isinstance(load_plugins(["ckpg_dup_plugin:plugin"]).plugins[0], Plugin)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ckpg_dup_plugin", None)


async def test_the_app_does_not_start_with_a_bad_plugin(make_client: MakeClient) -> None:
    with pytest.raises(ConfigurationError, match="CHATKIT_PLUGINS entry"):
        await make_client(chatkit_plugins=["examples.no_such_plugin:plugin"])


async def test_serve_stops_with_one_line(database_url: str, tmp_path: Path) -> None:
    """(``migrate`` takes the same path: ``app.cli.commands.migrate`` loads the plugins first.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "PRODUCTION"))}
    env |= {
        "DATABASE_URL": database_url,
        "DATA_DIR": str(tmp_path),
        "PORT": "59001",
        "CHATKIT_PLUGINS": f"{PLUGIN},examples.no_such_plugin:plugin",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "serve",
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert stdout == b""
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "chatkit-pg cannot start: CHATKIT_PLUGINS entry 'examples.no_such_plugin:plugin': "
        "cannot import examples.no_such_plugin (ModuleNotFoundError"
    ), lines


GENERATOR_PLUGIN = """
from app.chat.plugins import ActionRejectedError, Plugin, replace_widget
from examples.plugin_tasks.plugin import Task, task_widget

async def stamp(ctx):
    async for event in replace_widget(ctx.sender, task_widget([Task(7, "From a generator", True)])):
        yield event

async def refuse(ctx):
    raise ActionRejectedError("Refused while streaming.")
    yield

plugin = Plugin(name="gen", actions={"gen.stamp": stamp, "gen.refuse": refuse})
"""


async def test_async_generator_handlers_stream_and_reject_with_an_error_event(
    make_client: MakeClient, plugin_db: str, pstore: PostgresStore, tmp_path: Path
) -> None:
    (tmp_path / "ckpg_gen_plugin.py").write_text(GENERATOR_PLUGIN)
    sys.path.insert(0, str(tmp_path))
    try:
        await add_tasks(pstore, "alice", "Buy milk")
        client = await make_client(
            model=show_tasks_model(),
            database_url=plugin_db,
            chatkit_plugins=[PLUGIN, "ckpg_gen_plugin:plugin"],
        )
        thread_id, widget = await show_widget(client, pstore)

        events = await client.stream(
            "threads.custom_action", action(thread_id, widget["id"], "gen.refuse", {})
        )
        (error,) = of_type(events, "error")
        assert (error["code"], error["message"], error["allow_retry"]) == (
            "custom",
            "Refused while streaming.",
            False,
        )
        assert not of_type(events, "thread.item.replaced")

        events = await client.stream(
            "threads.custom_action", action(thread_id, widget["id"], "gen.stamp", {})
        )
        (replaced,) = of_type(events, "thread.item.replaced")
        stored = await pstore.load_item(thread_id, widget["id"], ALICE)
        assert isinstance(stored, WidgetItem)
        assert rows_of(stored.widget.model_dump(mode="json"))[0][:2] == ("From a generator", "Undo")
        assert rows_of(replaced["item"]["widget"]) == rows_of(stored.widget.model_dump(mode="json"))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ckpg_gen_plugin", None)


NAIVE_PLUGIN = """
from app.chat.plugins import Plugin, replace_widget
from examples.plugin_tasks.plugin import set_done_and_list, task_widget

async def done(ctx):  # the payload's value straight to SQL, unchecked
    tasks = await set_done_and_list(ctx.database(), ctx.payload["task_id"], True)
    return replace_widget(ctx.sender, task_widget(tasks))

async def undo(ctx):
    return task_widget(await set_done_and_list(ctx.database(), ctx.payload["task_id"], False))

async def gen(ctx):  # an async generator: its work runs after the response started
    tasks = await set_done_and_list(ctx.database(), ctx.payload["task_id"], True)
    async for event in replace_widget(ctx.sender, task_widget(tasks)):
        yield event

plugin = Plugin(
    name="naive",
    actions={"naive.done": done, "naive.gen": gen},
    sync_actions={"naive.undo": undo},
)
"""


async def test_values_the_database_refuses_are_400_for_any_plugin(
    make_client: MakeClient, plugin_db: str, pstore: PostgresStore, tmp_path: Path
) -> None:
    """A plugin that sends a payload's value to SQL unchecked: what PostgreSQL or the driver
    refuses as data (an integer beyond bigint, text where a number goes) is a 400."""
    (tmp_path / "ckpg_naive_plugin.py").write_text(NAIVE_PLUGIN)
    sys.path.insert(0, str(tmp_path))
    try:
        (milk,) = await add_tasks(pstore, "alice", "Buy milk")
        client = await make_client(
            model=show_tasks_model(),
            database_url=plugin_db,
            chatkit_plugins=[PLUGIN, "ckpg_naive_plugin:plugin"],
        )
        thread_id, widget = await show_widget(client, pstore)
        for kind, type_ in (
            ("threads.custom_action", "naive.done"),
            ("threads.sync_custom_action", "naive.undo"),
        ):
            for bad in (2**63, -(2**63) - 1, "milk"):
                payload = {"task_id": bad}
                response = await client.request(
                    kind, action(thread_id, widget["id"], type_, payload)
                )
                assert response.status_code == 400, (kind, bad, response.text)
                assert response.json()["error"]["code"] == "action_rejected"
        # too late for a 400: an error event that says so, not a stream.error
        late = action(thread_id, widget["id"], "naive.gen", {"task_id": 2**63})
        (error,) = of_type(await client.stream("threads.custom_action", late), "error")
        assert (error["code"], error["message"]) == ("custom", "The action was rejected.")
        assert await done_flags(pstore, "alice") == {"Buy milk": False}
        done = action(thread_id, widget["id"], "naive.done", {"task_id": milk})
        await client.stream("threads.custom_action", done)
        assert await done_flags(pstore, "alice") == {"Buy milk": True}
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ckpg_naive_plugin", None)


async def test_a_plugins_session_state_never_reaches_the_next_borrower(
    plugin_db: str, test_settings: Settings
) -> None:
    """The pool returns connections without a reset (app.pg.pool): the app leaves no session
    state. A plugin's code may (a plain SET, a session advisory lock), so its transaction
    resets the session and restores the pool's own settings before the next borrower, who may
    act for another user."""
    one = test_settings.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0})
    pool = await open_pool(plugin_db, one)
    try:
        store = PostgresStore(pool)
        async with UserDatabase(store, "alice").transaction() as conn:
            pid = conn.get_server_pid()
            await conn.execute("SET search_path TO pg_catalog")
            await conn.execute("SET statement_timeout TO 1")
            await conn.execute("SELECT pg_advisory_lock(42)")
        async with store.connection() as conn:
            assert conn.get_server_pid() == pid  # the same session, handed on
            assert await conn.fetchval("SHOW search_path") == '"$user", public'
            assert await conn.fetchval("SHOW statement_timeout") == "10s"
            held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1"
            assert await conn.fetchval(held, pid) == 0
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
    finally:
        await pool.close()


async def test_user_database_is_held_by_row_level_security(
    plugin_db: str, pstore: PostgresStore, test_settings: Settings
) -> None:
    """Through a role that does not bypass row-level security (as the app connects in
    production), even SQL that forgets its ``user_id`` filter sees and writes only the user's
    rows of the plugin's table."""
    await add_tasks(pstore, "alice", "Alice's secret")
    await add_tasks(pstore, "bob", "Bob's chore")
    role = f"ckpg_plugin_{secrets.token_hex(6)}"
    password = secrets.token_urlsafe(18)
    admin = await asyncpg.connect(PgServer.dsn(plugin_db))
    pool = None
    try:
        await admin.execute(
            f"CREATE ROLE {role} LOGIN PASSWORD '{password}' NOSUPERUSER NOBYPASSRLS"
        )
        await admin.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        await admin.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON plugin_tasks TO {role}")
        url = make_url(plugin_db).set(username=role, password=password)
        pool = await open_pool(url.render_as_string(hide_password=False), test_settings)
        bob = UserDatabase(PostgresStore(pool), "bob")
        async with bob.transaction() as conn:
            assert await conn.fetch("SELECT title FROM plugin_tasks") == [("Bob's chore",)]
            assert await conn.execute("UPDATE plugin_tasks SET done = true") == "UPDATE 1"
            # The identity column needs no grant of its own.
            await conn.execute("INSERT INTO plugin_tasks (user_id, title) VALUES ('bob', 'more')")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with bob.transaction() as conn:
                await conn.execute(
                    "INSERT INTO plugin_tasks (user_id, title) VALUES ('alice', 'planted')"
                )
        async with PostgresStore(pool).connection() as conn:  # no user set: nothing
            assert await conn.fetchval("SELECT count(*) FROM plugin_tasks") == 0
        assert await done_flags(pstore, "alice") == {"Alice's secret": False}
        assert await done_flags(pstore, "bob") == {"Bob's chore": True, "more": False}
    finally:
        if pool is not None:
            await pool.close()
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def test_migrate_runs_every_plugin_branch(pg_server: PgServer, tmp_path: Path) -> None:
    """``app.cli.commands.migrate`` (what ``python -m app migrate`` and ``serve`` run) upgrades the
    app's branch and the plugin's, which ``/readyz`` then expects."""
    from app.cli.commands import migrate
    from app.http.health import alembic_heads

    url = await pg_server.create_database("ckpg_plugin_migrate")
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        settings = Settings(database_url=url, data_dir=tmp_path, chatkit_plugins=[PLUGIN])
        await asyncio.to_thread(migrate, settings)
        conn = await asyncpg.connect(PgServer.dsn(url))
        try:
            versions = {r[0] for r in await conn.fetch("SELECT version_num FROM alembic_version")}
            assert await conn.fetchval("SELECT to_regclass('plugin_tasks') IS NOT NULL")
        finally:
            await conn.close()
        heads = alembic_heads(load_plugins([PLUGIN]).migration_locations)
        assert versions == heads and "plugin_tasks_0001" in heads and len(heads) == 2
        assert alembic_heads() == heads - {"plugin_tasks_0001"}
    finally:
        root.setLevel(level)  # alembic.ini's logging configuration, undone
        root.handlers[:] = handlers
        await pg_server.drop_database(url)
