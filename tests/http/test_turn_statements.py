"""Round trips of a turn (``threads.add_user_message``), as PostgreSQL logs them
(tests/harness/pglog.py: ``log_statement = all`` on a private server).

"Before the first event" is cut by what the first event waits for, not by when it reaches the
client: the stream's producer runs ahead of the socket (app.http.sse.EventPump), so a log
offset read on arrival would also count the statements the server sent while the event was on
its way, as many as the scheduling allowed. The first event of a turn is the user message's
``thread.item.done``, which the SDK yields as soon as that message's INSERT returns: the
statements it waits for are those logged up to that INSERT (found by the item's id among the
logged parameters).

The app is served by a real uvicorn in the test's loop (tests/harness/loopback.py) and read
over real HTTP as it streams; the offline model replies at once. The figures are the issue's
(docs/runs.md "Round trips"): without the opt-in, with it (the run log's batches counted apart,
since how many there are depends on how long the reply takes), and before the first event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from tests.harness.chatkit_client import token_for, user_input
from tests.harness.loopback import serve
from tests.harness.pginstance import PgInstance, private_postgres
from tests.harness.pglog import executions_since, log_offset, logged_database
from tests.harness.runs import RESUMABLE

DATABASE = "ckpg_turns"
DEADLINE = 60  # seconds; only against hangs
APPEND = "SELECT chatkit_run_append("


@pytest.fixture(scope="module")
def logging_pg() -> Iterator[PgInstance]:
    with private_postgres() as pg:
        yield pg


@dataclass
class Turn:
    statements: list[str]  # every statement of the turn, in order
    before_first_event: list[str]
    events: list[dict[str, Any]]

    @property
    def appends(self) -> list[str]:
        return [s for s in self.statements if s.startswith(APPEND)]

    @property
    def others(self) -> list[str]:
        return [s for s in self.statements if not s.startswith(APPEND)]


async def idle(app: Any) -> None:
    """Until the app has nothing left running for a reply (the lease's release, the run's
    last batch are background tasks that may end after the response)."""
    runtime = app.state.runtime
    deadline = time.monotonic() + DEADLINE
    while runtime.open_streams or len(runtime.tasks) or (runtime.runs and len(runtime.runs)):
        assert time.monotonic() < deadline, "the reply never finished its writes"
        await asyncio.sleep(0.01)


async def turn(
    pg: PgInstance,
    app: Any,
    http: httpx.AsyncClient,
    settings: Settings,
    thread_id: str,
    *,
    resumable: bool,
) -> Turn:
    await idle(app)
    body = {
        "type": "threads.add_user_message",
        "params": {"thread_id": thread_id, "input": user_input("How many round trips?")},
    }
    headers = {
        "Authorization": f"Bearer {token_for('alice', settings)}",
        "Content-Type": "application/json",
        **(RESUMABLE if resumable else {}),
    }
    start = log_offset(pg)
    response = await http.post(settings.chatkit_path, content=json.dumps(body), headers=headers)
    assert response.status_code == 200, response.text
    await idle(app)
    events = [
        json.loads(line[6:]) for line in response.text.split("\n") if line.startswith("data: ")
    ]
    first = events[0]
    assert first["type"] == "thread.item.done" and first["item"]["type"] == "user_message"
    logged = executions_since(pg, start)
    stored = [
        n
        for n, (sql, parameters) in enumerate(logged)
        if sql.startswith("INSERT INTO chatkit_items") and f"'{first['item']['id']}'" in parameters
    ]
    assert len(stored) == 1, logged
    statements = [sql for sql, _ in logged]
    return Turn(statements, statements[: stored[0] + 1], events)


def show(turn: Turn) -> str:
    return "\n".join(s[:160] for s in turn.statements)


async def test_a_turn_takes_few_round_trips(logging_pg: PgInstance, app_settings: Settings) -> None:
    url = await logged_database(logging_pg, DATABASE)
    settings = app_settings.model_copy(
        update={
            "database_url": url,
            "rate_limit_per_minute": 1000,
            "max_streams_per_user": 3,
            # No renewal inside a turn: the lease outlives any reply here.
            "stream_lease_seconds": 600.0,
            "db_pool_size": 1,
            "db_max_overflow": 0,
        }
    )
    app = create_app(settings)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=DEADLINE) as http:
        created = await http.post(
            settings.chatkit_path,
            json={"type": "threads.create", "params": {"input": user_input("Hello")}},
            headers={"Authorization": f"Bearer {token_for('alice', settings)}"},
        )
        thread_id = next(
            json.loads(line[6:]) for line in created.text.split("\n") if line.startswith("data: ")
        )["thread"]["id"]
        # Once each first: a connection's first use of a statement or a type may ask more.
        await turn(logging_pg, app, http, settings, thread_id, resumable=False)
        await turn(logging_pg, app, http, settings, thread_id, resumable=True)

        plain = await turn(logging_pg, app, http, settings, thread_id, resumable=False)
        opted = await turn(logging_pg, app, http, settings, thread_id, resumable=True)
    print(f"without the opt-in ({len(plain.statements)}):\n{show(plain)}")
    print(f"before its first event: {len(plain.before_first_event)}")
    print(
        f"with the opt-in ({len(opted.statements)}, {len(opted.appends)} batches):\n{show(opted)}"
    )
    print(f"before its first event: {len(opted.before_first_event)}")
    assert plain.events[0]["type"] == "thread.item.done"
    assert [e["type"] for e in plain.events] == [e["type"] for e in opted.events]
    assert not plain.appends and opted.appends
    assert len(plain.statements) <= 6, show(plain)
    # One batch for a reply that streams at once; more only when it took longer than a flush.
    assert len(opted.others) + 1 <= 7, show(opted)
    assert len(plain.before_first_event) <= 3, show(plain)
    assert len(opted.before_first_event) <= 3, show(opted)
