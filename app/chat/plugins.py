"""Python plugins: a team's tools, widgets, widget actions and tables, without editing ``app/``.

``CHATKIT_PLUGINS`` lists ``module:attribute`` entries; each attribute is a ``Plugin``. The app
loads them at startup (a wrong entry stops it with one line naming the setting) and:

* gives the agent each plugin's function tools and appends its ``instructions`` to the prompt;
  a tool streams widgets through ``ctx.context.stream_widget(...)`` and reaches the plugin's
  tables through ``user_database(ctx.context)``;
* routes ``threads.custom_action`` (streaming) and ``threads.sync_custom_action`` by the
  action's ``type`` to the plugin that declared it, only for a widget item of a thread the user
  owns (``ChatKitPgServer.precheck``);
* runs each plugin's Alembic revisions (``migrations``) with ``python -m app migrate``.

A handler refuses a payload by raising ``ActionRejectedError`` before it yields anything: the
client gets a 400, never a 500. Check every value of a payload before it reaches SQL (an
integer against its column's range: ``PgBigInt``); a value the database still refuses as data
(SQLSTATE class 22, or too large for an index) is a 400 as well. See docs/customising.md and
examples/plugin_tasks/.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import asyncpg
from agents import Tool
from chatkit.actions import Action
from chatkit.agents import AgentContext
from chatkit.types import ThreadItemReplacedEvent, ThreadMetadata, ThreadStreamEvent, WidgetItem
from chatkit.widgets import WidgetRoot
from pydantic import Field, SkipValidation

from app.context import RequestContext
from app.errors import ActionRejectedError, ConfigurationError
from app.pg.store import PostgresStore

__all__ = [
    "ActionContext",
    "ActionRejectedError",
    "PgBigInt",
    "Plugin",
    "PluginAgentContext",
    "PluginSet",
    "UserDatabase",
    "load_plugins",
    "replace_widget",
    "user_database",
]

log = logging.getLogger(__name__)

PgBigInt = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
"""An integer a ``bigint`` column can hold, and only a JSON integer (not ``true``, ``"7"`` or
``7.0``): for a payload model's fields (narrow it further, e.g. ``Field(ge=1)`` for an id)."""


# --- the database, scoped to one user -------------------------------------------------------


class UserDatabase:
    """The app's connection pool, for a plugin's own tables, acting for one user.

    ``transaction()`` borrows a pooled connection, opens a transaction and sets ``app.user_id``
    for it, as every statement of the store does, so a table with the row-level security
    policy of migration 0003 (``user_id = current_setting('app.user_id', true)``) shows and
    accepts only this user's rows. Filter by ``user_id`` in the SQL too (``db.user_id``): the
    policy is the second wall, not the only one (docs/rls.md). Keep transactions short: never
    hold one across a model call or a stream.
    """

    def __init__(self, store: PostgresStore, user_id: str) -> None:
        self._store = store
        self.user_id = user_id

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._store.connection() as conn:
            try:
                async with conn.transaction():
                    await conn.execute("SELECT set_config('app.user_id', $1, true)", self.user_id)
                    yield conn
            finally:
                # The pool hands connections back without a reset (app.pg.pool): the app leaves
                # no session state, but a plugin's code may (a plain SET, LISTEN, a session
                # advisory lock), and the next borrower may be another user's request.
                if not conn.is_closed():
                    await conn.reset()
                    await self._store.pool.setup_session(conn)


class PluginAgentContext(AgentContext[RequestContext]):
    """The run context tools receive (``ctx.context``), with the user's database attached."""

    db: Annotated[UserDatabase | None, SkipValidation] = None


def user_database(context: AgentContext[Any]) -> UserDatabase:
    """The database of the user a tool runs for (``user_database(ctx.context)``)."""
    db = getattr(context, "db", None)
    if not isinstance(db, UserDatabase):
        raise RuntimeError("this app runs without a PostgreSQL store: plugins have no database")
    return db


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionContext:
    """What an action handler gets: the action, the widget item it came from (stored, owned by
    the user) and the user's database."""

    thread: ThreadMetadata
    action: Action[str, Any]
    sender: WidgetItem
    request: RequestContext
    db: UserDatabase | None

    @property
    def payload(self) -> Any:
        return self.action.payload

    def database(self) -> UserDatabase:
        if self.db is None:
            raise RuntimeError("this app runs without a PostgreSQL store: plugins have no database")
        return self.db


StreamingActionHandler = Callable[
    [ActionContext],
    Awaitable[AsyncIterator[ThreadStreamEvent]] | AsyncIterator[ThreadStreamEvent],
]
"""Best: an async function that checks the payload and does the work when awaited (raise
``ActionRejectedError`` there, before any byte is sent: a 400), then returns the events to stream
(``replace_widget`` is the common one). An async generator function works too, but everything in
it runs after the response started: a rejection there becomes an ``error`` event.
Replaced and finished items are saved by the server as they stream."""

SyncActionHandler = Callable[[ActionContext], Awaitable[WidgetRoot | None]]
"""Returns the sender's new widget (saved and sent back in place of the old one), or None to
leave it as it is."""


@contextmanager
def refusing_bad_values() -> Iterator[None]:
    """Around a handler's checks and work: a value of the payload that the database refuses as
    data (out of range, malformed, too large for an index) is the client's mistake, a 400
    naming nothing, rather than a 500. Handlers should check first; this is the net."""
    try:
        yield
    except (asyncpg.DataError, asyncpg.ProgramLimitExceededError) as exc:
        log.warning("action refused by the database", extra={"reason": type(exc).__name__})
        raise ActionRejectedError() from None


async def replace_widget(
    sender: WidgetItem, widget: WidgetRoot
) -> AsyncIterator[ThreadStreamEvent]:
    """The events replacing ``sender``'s widget by ``widget`` (same item, stored again)."""
    yield ThreadItemReplacedEvent(item=sender.model_copy(update={"widget": widget}))


# --- plugins -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plugin:
    """What one plugin contributes; every part is optional but the name.

    ``migrations`` is a folder of Alembic revision scripts for the plugin's own tables, on a
    branch of their own (first revision: ``down_revision = None`` and a ``branch_labels`` entry
    named after the plugin); ``python -m app migrate`` upgrades every branch to its head.
    """

    name: str
    tools: Sequence[Tool] = ()
    instructions: str = ""
    actions: Mapping[str, StreamingActionHandler] = field(default_factory=dict)
    sync_actions: Mapping[str, SyncActionHandler] = field(default_factory=dict)
    migrations: Path | None = None


@dataclass(frozen=True)
class PluginSet:
    """Every loaded plugin's contributions, merged (action types are unique across plugins)."""

    plugins: tuple[Plugin, ...] = ()
    actions: Mapping[str, StreamingActionHandler] = field(default_factory=dict)
    sync_actions: Mapping[str, SyncActionHandler] = field(default_factory=dict)

    @property
    def tools(self) -> list[Tool]:
        return [tool for plugin in self.plugins for tool in plugin.tools]

    @property
    def migration_locations(self) -> list[Path]:
        return [p.migrations for p in self.plugins if p.migrations is not None]

    def instructions(self, base: str) -> str:
        """The agent's instructions followed by each plugin's."""
        parts = [base, *(p.instructions.strip() for p in self.plugins if p.instructions.strip())]
        return "\n\n".join(parts)

    def handles(self, action_type: str, *, streaming: bool) -> bool:
        return action_type in (self.actions if streaming else self.sync_actions)


def _fail(entry: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"CHATKIT_PLUGINS entry {entry!r}: {problem}")


def load_plugin(entry: str) -> Plugin:
    """Import ``module:attribute`` and check it is a well-formed ``Plugin``."""
    module_name, sep, attribute = entry.partition(":")
    if not sep or not module_name or not attribute:
        raise _fail(entry, "expected module:attribute")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing is the plugin's, reported alike
        first_line = next(iter(str(exc).splitlines()), "")
        raise _fail(
            entry, f"cannot import {module_name} ({type(exc).__name__}: {first_line})"
        ) from exc
    plugin = getattr(module, attribute, None)
    if not isinstance(plugin, Plugin):
        raise _fail(
            entry, f"{attribute} is a {type(plugin).__name__}, not an app.chat.plugins.Plugin"
        )
    if not plugin.name or not plugin.name.isidentifier():
        raise _fail(entry, "the plugin's name must be an identifier")
    for tool in plugin.tools:
        if not hasattr(tool, "name"):
            raise _fail(entry, f"tools must be Agents SDK tools, not {type(tool).__name__}")
    for kind in (plugin.actions, plugin.sync_actions):
        for action_type, handler in kind.items():
            if not isinstance(action_type, str) or not action_type or not callable(handler):
                raise _fail(entry, "actions map action types (text) to async functions")
    if plugin.migrations is not None and not Path(plugin.migrations).is_dir():
        raise _fail(entry, f"its migrations folder {plugin.migrations} does not exist")
    return plugin


def load_plugins(entries: Sequence[str]) -> PluginSet:
    """Every ``CHATKIT_PLUGINS`` entry, or ``ConfigurationError`` naming the first bad one."""
    plugins: list[Plugin] = []
    actions: dict[str, StreamingActionHandler] = {}
    sync_actions: dict[str, SyncActionHandler] = {}
    names: set[str] = set()
    for entry in entries:
        plugin = load_plugin(entry.strip())
        if plugin.name in names:
            raise _fail(entry, f"another plugin is also named {plugin.name}")
        names.add(plugin.name)
        taken = sorted(
            (set(plugin.actions) & set(actions)) | (set(plugin.sync_actions) & set(sync_actions))
        )
        if taken:
            raise _fail(entry, f"action type {taken[0]} is handled by another plugin")
        actions.update(plugin.actions)
        sync_actions.update(plugin.sync_actions)
        plugins.append(plugin)
    return PluginSet(tuple(plugins), actions, sync_actions)
