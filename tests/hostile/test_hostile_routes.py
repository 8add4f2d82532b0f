"""The JSON and SSE routes beside the ChatKit protocol, fuzzed against the real app behind uvicorn
(no 500 from any input, docs/runs.md and docs/search.md): a run's events and its cancel, a
thread's running reply, and the history search. Their inputs are path segments, a
``Last-Event-ID`` header and query strings; each is drawn from hostile text, the ids of the two
seeded users and ids nobody has.

What must hold for every answer: no 5xx; an error is JSON ``{"error": {...}}`` with the known
keys and no exception text; nothing of the other user's leaks (their ids, their marker text);
and an id of the other user's answers exactly as an id nobody has (the same status and body,
but for the request id). Each user has one ended resumable reply: resuming one's own is the
only answer that may be a stream, and it must end.

The world is test_hostile.py's (tests/harness/hostile_world.py: two seeded users, a module
started app). A fixed budget of examples, the same every run (derandomized), scaled by
``HOSTILE_EXAMPLES``; ``HOSTILE_RANDOM=1`` explores new ones.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from app.pg.pool import ConnectionPool
from app.settings import Settings
from tests.harness.chatkit_client import user_input
from tests.harness.faults import DEADLINE
from tests.harness.hostile_fuzz import hostile
from tests.harness.hostile_world import (
    ALICE_ID,
    ERROR_KEYS,
    EXCEPTION_TEXT,
    World,
    other,
    seeded_world,
)
from tests.harness.runs import RESUMABLE

EXAMPLES = 150
ROUTES = ("events", "cancel", "thread_run", "search")
ALLOWED = {200, 202, 400, 401, 404, 405, 413, 414, 429}

# Text a client might send: any Unicode, SQL and URL syntax, ids' shapes, huge values.
HOSTILE = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "",
            " ",
            "..",
            "%00",
            "run_",
            "thr_",
            "' OR 1=1 --",
            "run_x:1",
            ":",
            "-1",
            "1e309",
            "2147483648",
            "\u202e\u0000",
            "a" * 5000,
        ]
    ),
)
# What h11 lets a client send: printable ASCII without surrounding spaces.
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120).map(
    str.strip
)


@dataclass(frozen=True)
class RouteCase:
    route: str
    target: str  # "mine", "theirs", "missing" or "text"
    text: str  # the hostile segment when target is "text"
    last_event_id: str | None
    prefix_run: bool  # Last-Event-ID is "<the run's id>:<last_event_id>"
    query: tuple[tuple[str, str], ...]


@st.composite
def route_case(draw: st.DrawFn) -> RouteCase:
    route = draw(st.sampled_from(ROUTES))
    target = draw(st.sampled_from(("mine", "theirs", "missing", "text")))
    text = draw(HOSTILE)
    last = draw(st.none() | HEADER_TEXT)
    prefix_run = last is not None and draw(st.booleans())
    names = {"events": ["after"], "search": ["q", "limit", "cursor", "after"]}.get(route, ["x"])
    query = draw(st.lists(st.tuples(st.sampled_from(names), HOSTILE), max_size=3))
    return RouteCase(route, target, text, last, prefix_run, tuple(query))


MISSING_RUN = "run_" + "0123456789abcdef" * 2


@dataclass(frozen=True)
class Seeded:
    world: World
    runs: dict[str, str]  # user -> the id of their ended resumable reply

    def __repr__(self) -> str:
        return "Seeded(alice, bob)"


async def ended_run(world: World, user: str) -> str:
    """An opted-in reply, read to its end: a run resumable until the retention passes."""
    body = {"type": "threads.create", "params": {"input": user_input("Resume me")}}
    headers = {**world.client.auth(user), **RESUMABLE, "Content-Type": "application/json"}
    path = world.client.path
    async with world.client.http.stream("POST", path, json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        await response.aread()
    return response.headers["x-chatkit-run"]


@pytest.fixture(scope="module")
async def seeded(
    test_settings: Settings, engine: AsyncEngine, pool: ConnectionPool
) -> AsyncIterator[Seeded]:
    async with seeded_world(test_settings, engine, pool, live=True) as world:
        runs = {user: await ended_run(world, user) for user in (ALICE_ID, other(ALICE_ID))}
        yield Seeded(world, runs)


def target_id(seeded: Seeded, case: RouteCase) -> str:
    """The path's id: a thread's for the thread route, a run's for the run routes."""
    if case.target == "text":
        return case.text
    thread_route = case.route == "thread_run"
    if case.target == "missing":
        return seeded.world.missing["thread"] if thread_route else MISSING_RUN
    user = ALICE_ID if case.target == "mine" else other(ALICE_ID)
    return seeded.world.ids[user]["thread"] if thread_route else seeded.runs[user]


def request_of(world: World, case: RouteCase, segment: str) -> tuple[str, str, dict[str, str]]:
    path = world.client.path
    seg = quote(segment, safe="")
    method, url = {
        "events": ("GET", f"{path}/runs/{seg}/events"),
        "cancel": ("POST", f"{path}/runs/{seg}/cancel"),
        "thread_run": ("GET", f"{path}/threads/{seg}/run"),
        "search": ("GET", f"{path}/threads/search"),
    }[case.route]
    if case.query:
        url += "?" + urlencode(case.query)
    headers = world.client.auth(ALICE_ID)
    if case.last_event_id is not None:
        value = (f"{segment}:" if case.prefix_run else "") + case.last_event_id
        # What h11 lets a client send (the path's text may hold anything).
        headers["Last-Event-ID"] = "".join(c for c in value if " " <= c <= "~").strip()
    return method, url, headers


async def answer(world: World, case: RouteCase, segment: str) -> httpx.Response:
    method, url, headers = request_of(world, case, segment)
    async with asyncio.timeout(DEADLINE):  # an ended run's stream ends: never a hang
        async with world.client.http.stream(method, url, headers=headers) as response:
            await response.aread()
    return response


# uvicorn's own answer to a request line it will not parse (a control character in the path):
# the app never sees it, and it says nothing about the app.
UNPARSED = (400, "Invalid HTTP request received.")


def check(world: World, case: RouteCase, response: httpx.Response) -> None:
    note = f"{case} -> {response.status_code} {response.text[:300]}"
    if (response.status_code, response.text) == UNPARSED:
        return
    assert response.status_code in ALLOWED, note
    if "text/event-stream" in response.headers.get("content-type", ""):
        assert (case.route, case.target) == ("events", "mine"), note
    body = response.text
    sent = case.text + (case.last_event_id or "") + json.dumps(case.query)
    for pattern in EXCEPTION_TEXT:
        shown = {m.group() for m in pattern.finditer(body)} - {
            m.group() for m in pattern.finditer(sent)
        }
        assert not shown, f"exception text {shown}: {note}"
    for secret in world.secrets(other(ALICE_ID)):
        if secret and secret not in sent:
            assert secret not in body, f"the other user's {secret!r} leaked: {note}"
    if response.status_code >= 400:
        error = response.json().get("error")
        assert isinstance(error, dict) and set(error) <= ERROR_KEYS, note


def without_request_id(response: httpx.Response) -> tuple[int, str]:
    data = response.json() if response.status_code >= 400 else {}
    if isinstance(data.get("error"), dict):
        data["error"].pop("request_id", None)
    return response.status_code, json.dumps(data, sort_keys=True)


@hostile(EXAMPLES)
@given(case=route_case())
async def test_fuzz_the_routes_beside_the_protocol(seeded: Seeded, case: RouteCase) -> None:
    world = seeded.world
    response = await answer(world, case, target_id(seeded, case))
    check(world, case, response)
    if case.target == "theirs" and case.route != "search":
        twin = RouteCase(case.route, "missing", "", case.last_event_id, case.prefix_run, case.query)
        missing = await answer(world, twin, target_id(seeded, twin))
        assert without_request_id(response) == without_request_id(missing), case
