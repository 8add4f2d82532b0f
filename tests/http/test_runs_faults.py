"""A follower of a resumable reply whose database goes away (docs/runs.md): two apps under real
uvicorn on one database, A directly, B through a TCP proxy the test cuts. A runs the reply; a
client follows it through B, which reads A's log. When B cannot read the log any more, its
stream is dropped, not ended: a clean end (or an ``error`` event without an ``id:``) would tell
the client the reply is over while it is not. Once the database answers again, the client
resumes through B from the last event it has and gets the rest, every event exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx

from app.main import create_app
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness.chatkit_client import token_for, user_input
from tests.harness.faults import DEADLINE, GatedModel, until
from tests.harness.loopback import serve
from tests.harness.pg import PgServer
from tests.harness.runs import RESUMABLE, Event, parse_block
from tests.harness.tcpproxy import TcpProxy

BEFORE = ("One ", "two ", "three ")
AFTER = ("four ", "five.")


def headers(settings: Settings, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for('alice', settings)}", **more}


async def events_of(response: httpx.Response) -> AsyncIterator[Event]:
    """The SSE events of a response as they come (heartbeat comments skipped)."""
    block: list[str] = []
    async for line in response.aiter_lines():
        if line:
            block.append(line)
            continue
        event = parse_block("\n".join(block))
        block = []
        if event is not None:
            yield event


def delta(event: Event) -> str | None:
    update = event.data.get("update") or {}
    if event.type == "thread.item.updated" and "delta" in update:
        return str(update["delta"])
    return None


async def take(events: AsyncIterator[Event], until_delta: str) -> list[Event]:
    """Events up to the one carrying ``until_delta`` (the deadline turns a bug into a failure)."""
    got: list[Event] = []
    async with asyncio.timeout(DEADLINE):
        async for event in events:
            got.append(event)
            if delta(event) == until_delta:
                return got
    raise AssertionError(f"the stream ended before {until_delta!r}: {[e.data for e in got]}")


async def test_a_follower_cut_from_the_database_is_dropped_and_resumes_after(
    database_url: str,
    proxy: TcpProxy,
    via_proxy: str,
    app_settings: Settings,
    store: PostgresStore,  # empties the tables once the apps have stopped
) -> None:
    model = GatedModel(before=BEFORE, after=AFTER)
    settings_a = app_settings.model_copy(update={"run_poll_seconds": 0.05})
    settings_b = settings_a.model_copy(update={"database_url": via_proxy})
    app_a = create_app(settings_a, model=model)
    app_b = create_app(settings_b)
    body = {"type": "threads.create", "params": {"input": user_input("Count to five")}}
    admin = await asyncpg.connect(PgServer.dsn(database_url))
    try:
        async with (
            serve(app_a) as url_a,
            serve(app_b) as url_b,
            httpx.AsyncClient(base_url=url_a, timeout=30) as a,
            httpx.AsyncClient(base_url=url_b, timeout=30) as b,
        ):
            # The reply starts on A and stops at the model's gate after its third word; the
            # client leaves A (the run goes on) once A has logged everything before the gate.
            hdrs = headers(settings_a, **RESUMABLE, Accept="text/event-stream")
            async with a.stream("POST", "/chatkit", json=body, headers=hdrs) as response:
                assert response.status_code == 200, await response.aread()
                run_id = response.headers["x-chatkit-run"]
                on_a = await take(events_of(response), BEFORE[-1])
            held = on_a[-1].seq
            assert held is not None
            await until(
                lambda: admin.fetchval(
                    "SELECT last_seq >= $2 FROM chatkit_runs WHERE user_id = 'alice' AND id = $1",
                    run_id,
                    held,
                ),
                "A to log the events before the gate",
            )

            # Through B: everything logged, then B follows the log, polling, until it cannot.
            resume = headers(settings_b, **{"Last-Event-ID": f"{run_id}:0"})
            got: list[Event] = []
            dropped = False
            async with b.stream("GET", f"/chatkit/runs/{run_id}/events", headers=resume) as r:
                assert r.status_code == 200, await r.aread()
                stream = events_of(r)
                got += await take(stream, BEFORE[-1])
                proxy.refuse()  # B's database goes away: connections reset, new ones refused
                await proxy.cut()
                try:
                    async with asyncio.timeout(DEADLINE):
                        got += [event async for event in stream]
                except httpx.TransportError:
                    dropped = True  # the response did not end: the connection was dropped
            assert dropped, f"B ended the stream instead of dropping it: {[e.data for e in got]}"
            assert [e.seq for e in got] == list(range(1, held + 1)), [e.data for e in got]

            # The reply finishes on A meanwhile; once B's database is back, the client resumes
            # through B from its last event and gets the rest, exactly once, to the run's end.
            await proxy.accept()
            model.gate.set()
            resume = headers(settings_b, **{"Last-Event-ID": f"{run_id}:{held}"})
            async with b.stream("GET", f"/chatkit/runs/{run_id}/events", headers=resume) as r:
                assert r.status_code == 200, await r.aread()
                async with asyncio.timeout(DEADLINE):
                    rest = [event async for event in events_of(r)]
            state = await admin.fetchval(
                "SELECT state FROM chatkit_runs WHERE user_id = 'alice' AND id = $1", run_id
            )
    finally:
        await admin.close()
    assert state == "completed"
    everything = got + rest
    assert [e.seq for e in everything] == list(range(1, len(everything) + 1))
    assert {e.run_id for e in everything} == {run_id}
    assert "".join(d for d in map(delta, everything) if d is not None) == "".join(BEFORE + AFTER)
    assert not [e for e in everything if e.type == "error"]
