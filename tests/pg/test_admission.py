"""The rate limit folded into the page of ``threads.list`` and ``items.list`` (app.pg.admission).

* Over HTTP (the in-process app, the session's PostgreSQL): a burst of list requests, one after
  another or all at once, admits exactly the budget and refuses the rest with a 429 that carries
  ``Retry-After`` and none of the page; list requests that fail (a bad order, another user's
  thread, an unknown cursor) or that a store serves without the folded statement still count,
  once each; a request refused after its handler failed answers 429.
* In the store: a pending admission is consumed by exactly one page, and only for its user.
* On a private PostgreSQL logging every statement (``log_statement = all``, written by the
  backend before it runs the statement, so reading the log after the reply is exact): one
  statement per list request, two for a refused one (the page and ``Retry-After``).

tests/http/test_limits.py proves the budget across two backend processes (its bursts are
``threads.list``), tests/pg/test_rls.py the plans of the folded statements.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from chatkit.types import Page

from app.context import RequestContext
from app.errors import TooManyRequestsError
from app.main import create_app
from app.pg.admission import PendingAdmission
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness import factories as f
from tests.harness.chatkit_client import ChatKitClient, MakeClient
from tests.harness.pginstance import PgInstance, private_postgres
from tests.harness.pglog import logged_database, statements_since

RATE = 6  # a burst of 6, then one request every 10 s: a burst never waits for a refill
INTERVAL = 60 / RATE
ALICE = {"user_id": "alice"}


def refills_within(elapsed: float) -> int:
    """Requests' worth of budget that can come back in ``elapsed`` seconds (measured around
    the requests, so never less than the server saw): none unless a machine stalls 10 s."""
    return math.floor(elapsed / INTERVAL)


def assert_refused(response: httpx.Response) -> None:
    """A 429 ``rate_limited`` JSON answer with ``Retry-After`` in [1, INTERVAL] and no page."""
    assert response.status_code == 429, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == "rate_limited", body
    assert 1 <= int(response.headers["retry-after"]) <= INTERVAL, response.headers


async def seed(store: PostgresStore, user: str = "alice", items: int = 3) -> tuple[str, list[str]]:
    """A thread with ``items`` messages, written through the store (no request counted)."""
    thread = f.thread(title="seeded")
    ctx = {"user_id": user}
    await store.save_thread(thread, ctx)
    ids = []
    for n in range(items):
        item = f.user_message(thread.id, f"message {n}")
        await store.add_thread_item(thread.id, item, ctx)
        ids.append(item.id)
    return thread.id, ids


async def burst(
    client: ChatKitClient, bodies: list[tuple[str, dict[str, Any]]]
) -> list[httpx.Response]:
    """The requests one after another; asserts the budget held exactly (up to what refilled)
    and returns the responses."""
    started = time.monotonic()
    responses = [await client.request(kind, params) for kind, params in bodies]
    refills = refills_within(time.monotonic() - started)
    statuses = [r.status_code for r in responses]
    assert statuses[:RATE] == [200] * RATE, statuses
    assert statuses[RATE:].count(200) <= refills, statuses
    if refills == 0:
        assert statuses == [200] * RATE + [429] * (len(bodies) - RATE), statuses
    for response in responses:
        if response.status_code == 429:
            assert_refused(response)
    return responses


# --- over HTTP --------------------------------------------------------------------------------


async def test_a_burst_of_lists_admits_exactly_the_budget(
    make_client: MakeClient, store: PostgresStore
) -> None:
    client = await make_client(rate_limit_per_minute=RATE)
    thread_id, item_ids = await seed(store)
    threads = ("threads.list", {"limit": 5})
    items = ("items.list", {"thread_id": thread_id, "order": "asc"})
    for response in await burst(client, [threads, items] * 5):
        if response.status_code == 200:  # the admitted ones carried their pages
            data = response.json()["data"]
            assert [d["id"] for d in data] in ([thread_id], item_ids), data
    page = await client.call("threads.list", {}, user="bob")  # bob's budget is his own
    assert page == {"data": [], "has_more": False}


async def test_concurrent_lists_admit_exactly_the_budget(
    make_client: MakeClient, store: PostgresStore
) -> None:
    """All at once: the upsert's row lock orders them, as for the upfront admission."""
    client = await make_client(rate_limit_per_minute=RATE)
    thread_id, item_ids = await seed(store)
    bodies = [
        ("threads.list", {}) if n % 2 else ("items.list", {"thread_id": thread_id})
        for n in range(20)
    ]
    started = time.monotonic()
    responses = await asyncio.gather(*(client.request(k, p) for k, p in bodies))
    refills = refills_within(time.monotonic() - started)
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert RATE <= len(admitted) <= RATE + refills, [r.status_code for r in responses]
    for response in refused:
        assert_refused(response)
        assert thread_id not in response.text and item_ids[0] not in response.text
    for response in admitted:
        data = response.json()["data"]
        assert [d["id"] for d in data] in ([thread_id], list(reversed(item_ids))), data


async def test_failing_lists_count_once_each(make_client: MakeClient, store: PostgresStore) -> None:
    """Each kind of failure, then the budget's rest: the same exact count as for answers."""
    client = await make_client(rate_limit_per_minute=RATE)
    mine, _ = await seed(store)
    empty, _ = await seed(store, items=0)
    theirs, _ = await seed(store, user="bob")
    failing = [
        # refused by the parser (order is a literal): counted after the error
        (("items.list", {"thread_id": mine, "order": "sideways"}), 400),
        (("threads.list", {"order": "sideways"}), 400),
        # the folded page (empty) counted it, then the thread lookup found none of alice's
        (("items.list", {"thread_id": theirs}), 404),
        # the folded page counted it, then the cursor was not found
        (("items.list", {"thread_id": mine, "after": "msg_missing"}), 404),
    ]
    for (kind, params), status in failing:
        response = await client.request(kind, params)
        assert response.status_code == status, response.text
    # An empty thread of alice's: the page counts, its thread lookup does not count again.
    empty_list = ("items.list", {"thread_id": empty})
    statuses = [(await client.request(*empty_list)).status_code for _ in range(3)]
    assert statuses[: RATE - len(failing)] == [200] * (RATE - len(failing)), statuses
    # Spent: a failing list now answers 429, not its own error.
    for (kind, params), _status in failing:
        assert_refused(await client.request(kind, params))


class ListsWithoutPages(PostgresStore):
    """A store that serves ``threads.list`` without the page statement (an override, as a
    deployment's own store may have): nothing consumes the deferred admission."""

    async def load_threads(self, limit: int, after: str | None, order: str, context: Any) -> Any:
        return Page(data=[], has_more=False)


async def test_lists_a_store_serves_otherwise_are_counted_after(
    make_client: MakeClient, store: PostgresStore
) -> None:
    client = await make_client(rate_limit_per_minute=RATE, app_store=ListsWithoutPages(store.pool))
    await burst(client, [("threads.list", {})] * (RATE + 3))


async def test_other_requests_are_admitted_up_front(
    make_client: MakeClient, store: PostgresStore
) -> None:
    """A non-list request is refused before its handler runs: nothing is written."""
    client = await make_client(rate_limit_per_minute=RATE)
    thread_id, _ = await seed(store)
    for n in range(RATE):
        await client.call("threads.update", {"thread_id": thread_id, "title": f"t{n}"})
    refused = await client.request("threads.update", {"thread_id": thread_id, "title": "late"})
    assert_refused(refused)
    assert (await store.load_thread(thread_id, ALICE)).title == f"t{RATE - 1}"


# --- in the store -----------------------------------------------------------------------------


async def test_a_pending_admission_is_consumed_once_and_only_for_its_user(
    store: PostgresStore,
) -> None:
    thread_id, item_ids = await seed(store)
    bobs = PendingAdmission("bob", INTERVAL, 60.0)
    # The endpoint hands the deferred admission to the store on the request's context.
    await store.load_threads(10, None, "desc", RequestContext("alice", page_fold=bobs))
    assert not bobs.consumed  # alice's page: bob's stays pending
    for n in range(RATE + 1):
        admission = PendingAdmission("alice", INTERVAL, 60.0)
        alice = RequestContext("alice", page_fold=admission)
        if n < RATE:
            page = await store.load_thread_items(thread_id, None, 2, "asc", alice)
            assert [i.id for i in page.data] == item_ids[:2] and page.after == item_ids[1]
            # A second page in the same request is not counted again.
            more = await store.load_thread_items(thread_id, page.after, 2, "asc", alice)
            assert [i.id for i in more.data] == item_ids[2:] and not more.has_more
        else:
            with pytest.raises(TooManyRequestsError) as refused:
                await store.load_threads(10, None, "desc", alice)
            assert 1 <= refused.value.retry_after <= INTERVAL
        assert admission.consumed


# --- round trips, as PostgreSQL logs them -----------------------------------------------------

DATABASE = "ckpg_admission"


@pytest.fixture(scope="module")
def logging_pg() -> Iterator[PgInstance]:
    with private_postgres() as pg:
        yield pg


@pytest.fixture
async def logged_url(logging_pg: PgInstance) -> str:
    """A migrated database on the private server whose every statement is logged."""
    return await logged_database(logging_pg, DATABASE)


async def test_one_statement_per_list_request(
    logging_pg: PgInstance, logged_url: str, app_settings: Settings
) -> None:
    settings = app_settings.model_copy(
        update={
            "database_url": logged_url,
            "rate_limit_per_minute": RATE,
            "db_pool_size": 1,
            "db_max_overflow": 0,
        }
    )
    async with AsyncExitStack() as stack:
        app = create_app(settings)
        await stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app)
        http = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30)
        )
        client = ChatKitClient(app, http, settings)
        store: PostgresStore = app.state.runtime.store.inner
        thread_id, _ = await seed(store, items=25)
        lists = [
            ("threads.list", {}),
            ("items.list", {"thread_id": thread_id}),
            ("items.list", {"thread_id": thread_id, "limit": 10, "order": "asc"}),
        ]
        # Once each first: the connection's first use of a type or a statement may ask more.
        for kind, params in lists:
            await client.call(kind, params)
        offset = logging_pg.log_file.stat().st_size
        for kind, params in lists:
            await client.call(kind, params)
        folded = statements_since(logging_pg, offset)
        assert len(folded) == len(lists), folded
        assert all(s.startswith("WITH a AS (INSERT INTO chatkit_rate_limits") for s in folded)
        # The budget is spent (6 lists): a refusal costs the page's statement and Retry-After.
        offset = logging_pg.log_file.stat().st_size
        assert_refused(await client.request(*lists[0]))
        refused = statements_since(logging_pg, offset)
        assert len(refused) == 2 and "FROM chatkit_rate_limits WHERE" in refused[1], refused
