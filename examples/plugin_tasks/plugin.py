"""The task list plugin: ``CHATKIT_PLUGINS=examples.plugin_tasks.plugin:plugin``.

* Tools ``add_task`` and ``show_tasks`` show the user's tasks as a widget: one row per task with
  a "Done" button (a streaming action, ``tasks.complete``) or, once done, an "Undo" button (a
  sync action, ``tasks.reopen``). Both actions update the task and replace the widget in place.
* Tasks live in the table ``plugin_tasks`` (migrations/, run by ``python -m app migrate``), read
  and written through ``UserDatabase``: every transaction acts for the requesting user only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import asyncpg
from agents import RunContextWrapper, function_tool
from chatkit.agents import AgentContext
from chatkit.types import ThreadStreamEvent
from chatkit.widgets import DynamicWidgetRoot, WidgetRoot
from pydantic import BaseModel, Field, ValidationError

from app.chat.plugins import (
    ActionContext,
    ActionRejectedError,
    PgBigInt,
    Plugin,
    UserDatabase,
    replace_widget,
    user_database,
)
from app.context import RequestContext

COMPLETE = "tasks.complete"
REOPEN = "tasks.reopen"
MAX_TASKS_SHOWN = 20

ToolContext = RunContextWrapper[AgentContext[RequestContext]]


@dataclass(frozen=True)
class Task:
    id: int
    title: str
    done: bool


# --- storage -------------------------------------------------------------------------------------
# Every statement names the user too: row-level security is the second wall, not the only one.


async def fetch_tasks(conn: asyncpg.Connection, user_id: str) -> list[Task]:
    rows = await conn.fetch(
        "SELECT id, title, done FROM plugin_tasks WHERE user_id = $1 ORDER BY id LIMIT $2",
        user_id,
        MAX_TASKS_SHOWN,
    )
    return [Task(r["id"], r["title"], r["done"]) for r in rows]


async def list_tasks(db: UserDatabase) -> list[Task]:
    async with db.transaction() as conn:
        return await fetch_tasks(conn, db.user_id)


async def add_and_list(db: UserDatabase, title: str) -> list[Task]:
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO plugin_tasks (user_id, title) VALUES ($1, $2)", db.user_id, title
        )
        return await fetch_tasks(conn, db.user_id)


async def set_done_and_list(db: UserDatabase, task_id: int, done: bool) -> list[Task]:
    """The tasks after the change; the user must have that task (another user's is as missing
    as an unknown one), or the payload is rejected."""
    async with db.transaction() as conn:
        status = await conn.execute(
            "UPDATE plugin_tasks SET done = $3 WHERE user_id = $1 AND id = $2",
            db.user_id,
            task_id,
            done,
        )
        if status != "UPDATE 1":
            raise ActionRejectedError("There is no such task.")
        return await fetch_tasks(conn, db.user_id)


# --- the widget ----------------------------------------------------------------------------------


def _row(task: Task) -> dict[str, Any]:
    kind, label = (REOPEN, "Undo") if task.done else (COMPLETE, "Done")
    return {
        "type": "ListViewItem",
        "key": str(task.id),
        "children": [
            {
                "type": "Row",
                "gap": 2,
                "children": [
                    {"type": "Text", "value": task.title, "lineThrough": task.done},
                    {"type": "Spacer"},
                    {
                        "type": "Button",
                        "label": label,
                        "size": "sm",
                        "variant": "outline" if task.done else "solid",
                        "onClickAction": {
                            "type": kind,
                            "payload": {"task_id": task.id},
                            # Undo answers in place (sync); Done streams its replacement.
                            "streaming": not task.done,
                        },
                    },
                ],
            }
        ],
    }


def task_widget(tasks: list[Task]) -> WidgetRoot:
    """Built from plain data (what ``WidgetTemplate`` does after rendering a .widget file), so a
    task's title is a value, never markup."""
    empty = [{"type": "ListViewItem", "children": [{"type": "Text", "value": "No tasks yet."}]}]
    return DynamicWidgetRoot.model_validate(
        {"type": "ListView", "children": [_row(t) for t in tasks] or empty}
    )


def copy_text(tasks: list[Task]) -> str:
    return "\n".join(f"[{'x' if t.done else ' '}] {t.title}" for t in tasks)


# --- tools ---------------------------------------------------------------------------------------


@function_tool
async def add_task(ctx: ToolContext, title: str) -> str:
    """Add a task to the user's task list and show the list.

    Args:
        title: The task, in a few words.
    """
    title = " ".join(title.split())[:200]
    if not title:
        return "A task needs a title."
    tasks = await add_and_list(user_database(ctx.context), title)
    await ctx.context.stream_widget(task_widget(tasks), copy_text=copy_text(tasks))
    return f"Added the task. The user now sees {len(tasks)} task(s)."


@function_tool
async def show_tasks(ctx: ToolContext) -> str:
    """Show the user's task list."""
    tasks = await list_tasks(user_database(ctx.context))
    await ctx.context.stream_widget(task_widget(tasks), copy_text=copy_text(tasks))
    return f"Showing {len(tasks)} task(s)."


# --- actions -------------------------------------------------------------------------------------


class TaskPayload(BaseModel):
    # A bigint identity column: 1 to 2^63 - 1 (beyond, asyncpg cannot even send it).
    task_id: Annotated[PgBigInt, Field(ge=1)]


def _task_id(ctx: ActionContext) -> int:
    try:
        return TaskPayload.model_validate(ctx.payload).task_id
    except ValidationError:
        raise ActionRejectedError("The action needs the id of a task.") from None


async def complete(ctx: ActionContext) -> AsyncIterator[ThreadStreamEvent]:
    """Streaming action: mark the task done, then stream the widget's replacement."""
    tasks = await set_done_and_list(ctx.database(), _task_id(ctx), True)
    return replace_widget(ctx.sender, task_widget(tasks))


async def reopen(ctx: ActionContext) -> WidgetRoot | None:
    """Sync action: mark the task not done; the new widget is the answer."""
    tasks = await set_done_and_list(ctx.database(), _task_id(ctx), False)
    return task_widget(tasks)


plugin = Plugin(
    name="tasks",
    tools=[add_task, show_tasks],
    instructions=(
        "You keep the user's task list. Use add_task to add a task and show_tasks to show "
        "the list; the list appears as a widget with buttons, so do not repeat it in text."
    ),
    actions={COMPLETE: complete},
    sync_actions={REOPEN: reopen},
    migrations=Path(__file__).parent / "migrations",
)
