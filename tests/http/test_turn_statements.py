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
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from app.main import create_app
from app.pg.limits import TURN_BEGIN
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness import factories as f
from tests.harness.chatkit_client import MakeClient, error_text, parse_sse, token_for, user_input
from tests.harness.citus import CitusCluster, distributed_database
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
    body = message(thread_id)
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
    # The app's one connection (a coordinator also logs what other sessions send it).
    app_pid = next(pid for pid, sql, _ in logged if sql == TURN_BEGIN)
    mine = [(sql, parameters) for pid, sql, parameters in logged if pid == app_pid]
    stored = [
        n
        for n, (sql, parameters) in enumerate(mine)
        if sql.startswith(("INSERT INTO chatkit_items", "SELECT chatkit_add_item("))
        and f"'{first['item']['id']}'" in parameters
    ]
    assert len(stored) == 1, mine
    statements = [sql for sql, _ in mine]
    return Turn(statements, statements[: stored[0] + 1], events)


def message(thread_id: str) -> dict[str, Any]:
    return {
        "type": "threads.add_user_message",
        "params": {"thread_id": thread_id, "input": user_input("How many round trips?")},
    }


def show(turn: Turn) -> str:
    return "\n".join(s[:160] for s in turn.statements)


@contextlib.asynccontextmanager
async def served(
    url: str, app_settings: Settings, **overrides: Any
) -> AsyncIterator[tuple[Any, httpx.AsyncClient, Settings]]:
    """The app over the logged database ``url``, behind uvicorn, with one connection (a second
    one's first statements would be counted too) and ``overrides``. The run log shares it: in
    a pool of its own (RUN_LOG_POOL_SIZE, tests/http/test_runs_pool.py) its appends would be a
    second connection's, and the count is of every statement a turn sends."""
    update = {
        "database_url": url,
        "db_pool_size": 1,
        "db_max_overflow": 0,
        "run_log_pool_size": 0,
        **overrides,
    }
    settings = app_settings.model_copy(update=update)
    app = create_app(settings)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=DEADLINE) as http:
        yield app, http, settings


async def create_thread(http: httpx.AsyncClient, settings: Settings, user: str) -> str:
    created = await http.post(
        settings.chatkit_path,
        json={"type": "threads.create", "params": {"input": user_input("Hello")}},
        headers={"Authorization": f"Bearer {token_for(user, settings)}"},
    )
    assert created.status_code == 200, created.text
    return str(parse_sse(created.text)[0]["thread"]["id"])


async def turns(pg: PgInstance, url: str, app_settings: Settings) -> tuple[Turn, Turn]:
    """A turn without the opt-in and one with it, on the logged database ``url`` of ``pg``."""
    async with served(
        url,
        app_settings,
        rate_limit_per_minute=1000,
        max_streams_per_user=3,
        # No renewal inside a turn: the lease outlives any reply here.
        stream_lease_seconds=600.0,
    ) as (app, http, settings):
        thread_id = await create_thread(http, settings, "alice")
        # Once each first: a connection's first use of a statement or a type may ask more.
        await turn(pg, app, http, settings, thread_id, resumable=False)
        await turn(pg, app, http, settings, thread_id, resumable=True)

        plain = await turn(pg, app, http, settings, thread_id, resumable=False)
        opted = await turn(pg, app, http, settings, thread_id, resumable=True)
    report(plain, opted)
    return plain, opted


def report(plain: Turn, opted: Turn) -> None:
    """Shown with ``-s``: the figures docs/runs.md quotes."""
    print(f"without the opt-in ({len(plain.statements)}):\n{show(plain)}")
    print(f"before its first event: {len(plain.before_first_event)}")
    print(
        f"with the opt-in ({len(opted.statements)}, {len(opted.appends)} batches):\n{show(opted)}"
    )
    print(f"before its first event: {len(opted.before_first_event)}")


async def test_a_turn_takes_few_round_trips(logging_pg: PgInstance, app_settings: Settings) -> None:
    url = await logged_database(logging_pg, DATABASE)
    plain, opted = await turns(logging_pg, url, app_settings)
    assert [e["type"] for e in plain.events] == [e["type"] for e in opted.events]
    assert not plain.appends and opted.appends
    assert len(plain.statements) <= 6, show(plain)
    # One batch for a reply that streams at once; more only when it took longer than a flush.
    assert len(opted.others) + 1 <= 7, show(opted)
    assert len(plain.before_first_event) <= 3, show(plain)
    assert len(opted.before_first_event) <= 3, show(opted)


async def test_a_turn_refused_or_not_the_users_is_one_statement(
    logging_pg: PgInstance, app_settings: Settings
) -> None:
    """The opening statement counts the request, and a turn it stops there takes nothing: a
    thread of another user's answers exactly as a missing one, a spent budget is a 429 whose
    Retry-After came with the refusal."""
    url = await logged_database(logging_pg, DATABASE)
    async with served(url, app_settings, rate_limit_per_minute=4) as (app, http, settings):
        mine = await create_thread(http, settings, "alice")  # alice: 1
        theirs = await create_thread(http, settings, "bob")
        await turn(logging_pg, app, http, settings, mine, resumable=False)  # 2 (and a warm-up)
        answers = []
        for thread_id in (theirs, "thr_" + "0" * 32):  # 3, 4
            start = log_offset(logging_pg)
            response = await http.post(
                settings.chatkit_path,
                json=message(thread_id),
                headers={"Authorization": f"Bearer {token_for('alice', settings)}", **RESUMABLE},
            )
            assert response.status_code == 404, response.text
            answers.append(error_text(response))
            logged = executions_since(logging_pg, start)
            assert [sql for _, sql, _ in logged] == [TURN_BEGIN], logged
        assert answers[0] == answers[1]
        start = log_offset(logging_pg)
        refused = await http.post(
            settings.chatkit_path,
            json=message(mine),
            headers={"Authorization": f"Bearer {token_for('alice', settings)}"},
        )
        assert refused.status_code == 429, refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 15
        assert [sql for _, sql, _ in executions_since(logging_pg, start)] == [TURN_BEGIN]
        await idle(app)
        conn = await asyncpg.connect(logging_pg.dsn(DATABASE))
        try:
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM chatkit_stream_leases WHERE user_id = 'alice'"
                )
                == 0
            )
            # Only the warm-up turn's: the 404s started no run.
            assert (
                await conn.fetchval("SELECT count(*) FROM chatkit_runs WHERE user_id = 'alice'")
                == 0
            )
        finally:
            await conn.close()


async def test_a_turn_on_citus_takes_few_round_trips(
    citus: CitusCluster, app_settings: Settings
) -> None:
    """The same turns on a cluster, counted in the coordinator's log: the statements the app
    sends it (a write run as one there is BEGIN with the user's SETs, the write and COMMIT,
    app.pg.citus; a delegated function's call is one)."""
    url = await distributed_database(citus)
    admin = await asyncpg.connect(CitusCluster.tcp_dsn(citus.coordinator))
    try:
        name = str(make_url(url).database)
        await admin.execute(f"ALTER DATABASE \"{name}\" SET log_statement = 'all'")
    finally:
        await admin.close()
    plain, opted = await turns(citus.coordinator, url, app_settings)
    assert [e["type"] for e in plain.events] == [e["type"] for e in opted.events]
    assert len(plain.statements) <= 6, show(plain)
    assert len(opted.others) + 1 <= 7, show(opted)
    assert len(plain.before_first_event) <= 3, show(plain)
    assert len(opted.before_first_event) <= 3, show(opted)


async def test_a_turn_refused_after_it_opened_gives_its_lease_back(
    make_client: MakeClient, store: PostgresStore
) -> None:
    """A message whose attachment is another thread's is refused (409) after the statement that
    opened its turn took the lease: the lease goes back, and with the opt-in no run was
    started (its row is written only after the attachments' check). The thread then takes the
    next message at once."""
    client = await make_client(max_streams_per_user=1, thread_busy_wait_seconds=0)
    ctx = {"user_id": "alice"}
    mine, elsewhere = f.thread(), f.thread()
    for thread in (mine, elsewhere):
        await store.save_thread(thread, ctx)
    attachment = f.file_attachment(elsewhere.id)
    await store.save_attachment(attachment, ctx)
    refused = await client.request(
        "threads.add_user_message",
        {"thread_id": mine.id, "input": user_input("this", attachments=[attachment.id])},
        headers=RESUMABLE,
    )
    assert refused.status_code == 409, refused.text
    async with store.pool.acquire() as conn:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM chatkit_stream_leases WHERE user_id = 'alice'"
            )
            == 0
        )
        assert await conn.fetchval("SELECT count(*) FROM chatkit_runs WHERE user_id = 'alice'") == 0
    events = await client.send(mine.id, "and this")
    assert [e["type"] for e in events if e["type"] == "error"] == []
