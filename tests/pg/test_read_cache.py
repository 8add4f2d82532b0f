"""A streaming request's reads, made once (app.context.ReadCache, app.pg.store): the same rows as
the database's, never another user's, and forgotten as soon as the request writes them."""

from __future__ import annotations

import pytest
from chatkit.store import NotFoundError

from app.context import ReadCache, RequestContext
from app.pg.store import PostgresStore
from tests.harness import factories as f

pytestmark = pytest.mark.backends("owner", "role-custom", "citus-role")


async def test_a_requests_reads_are_the_databases_until_it_writes(store: PostgresStore) -> None:
    plain = RequestContext("alice")
    thread = f.thread(title="first")
    await store.save_thread(thread, plain)
    for n in range(3):
        await store.add_thread_item(thread.id, f.user_message(thread.id, f"m{n}"), plain)
    cached = RequestContext("alice", reads=ReadCache())

    assert (await store.load_thread(thread.id, cached)).title == "first"
    thread.title = "second"
    await store.save_thread(thread, cached)  # forgets what it read of the thread
    assert (await store.load_thread(thread.id, cached)).title == "second"

    history = await store.load_thread_items(thread.id, None, 40, "desc", cached)
    assert len(history.data) == 3 and not history.has_more
    for limit in (1, 2, 3, 5):
        assert await store.load_thread_items(
            thread.id, None, limit, "desc", cached
        ) == await store.load_thread_items(thread.id, None, limit, "desc", plain)
    # What a caller does to what it got is not what the next caller gets.
    first = (await store.load_thread_items(thread.id, None, 2, "desc", cached)).data[0]
    first.created_at = first.created_at.replace(year=2000)
    again = (await store.load_thread_items(thread.id, None, 2, "desc", cached)).data[0]
    assert again.created_at.year != 2000

    added = f.user_message(thread.id, "m3")
    await store.add_thread_item(thread.id, added, cached)  # forgets the thread's items
    latest = await store.load_thread_items(thread.id, None, 2, "desc", cached)
    assert latest.data[0].id == added.id and latest.has_more
    await store.delete_thread_item(thread.id, added.id, cached)
    assert (await store.load_thread_items(thread.id, None, 1, "desc", cached)).data[
        0
    ].id != added.id


async def test_a_partial_page_is_not_taken_for_a_longer_one(store: PostgresStore) -> None:
    plain = RequestContext("alice")
    thread = f.thread()
    await store.save_thread(thread, plain)
    for n in range(4):
        await store.add_thread_item(thread.id, f.user_message(thread.id, f"m{n}"), plain)
    cached = RequestContext("alice", reads=ReadCache())
    short = await store.load_thread_items(thread.id, None, 2, "desc", cached)
    assert short.has_more
    longer = await store.load_thread_items(thread.id, None, 4, "desc", cached)
    assert len(longer.data) == 4 and not longer.has_more


async def test_another_users_request_reads_for_itself(store: PostgresStore) -> None:
    thread = f.thread()
    await store.save_thread(thread, RequestContext("alice"))
    reads = ReadCache()
    await store.load_thread(thread.id, RequestContext("alice", reads=reads))
    with pytest.raises(NotFoundError):
        await store.load_thread(thread.id, RequestContext("bob", reads=ReadCache()))
    await store.delete_thread(thread.id, RequestContext("alice", reads=reads))
    with pytest.raises(NotFoundError):
        await store.load_thread(thread.id, RequestContext("alice", reads=reads))
