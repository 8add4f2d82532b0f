"""Contract suite for PostgresStore against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from chatkit.store import NotFoundError
from chatkit.types import (
    StructuredInputAnswer,
    StructuredInputItem,
    ThoughtTask,
    ThreadItem,
    WorkflowItem,
)
from pydantic import BaseModel

from app.errors import (
    AttachmentInUseError,
    InvalidInputError,
    ItemConflictError,
    MissingUserError,
)
from app.ids import new_id
from app.pg.store import PostgresStore
from tests.harness import factories as f

ALICE = {"user_id": "alice"}


@dataclass
class DataclassCtx:
    user_id: str


class PydanticCtx(BaseModel):
    user_id: str


BOB = DataclassCtx("bob")
CAROL = PydanticCtx(user_id="carol")


async def _thread(store: PostgresStore, ctx: object, **kw: object) -> str:
    t = f.thread(**kw)  # type: ignore[arg-type]
    await store.save_thread(t, ctx)
    return t.id


async def _all_items(
    store: PostgresStore, thread_id: str, ctx: object, order: str = "asc", limit: int = 7
) -> list[ThreadItem]:
    out: list[ThreadItem] = []
    after = None
    while True:
        page = await store.load_thread_items(thread_id, after, limit, order, ctx)
        out.extend(page.data)
        if not page.has_more:
            assert page.after is None  # the SDK's contract: the last page has no cursor
            return out
        assert page.after == page.data[-1].id
        after = page.after


# --- round trips --------------------------------------------------------------------------


async def test_thread_round_trip_exact(store: PostgresStore) -> None:
    t = f.thread(created_at=f.T0, title="Hi", metadata={"k": "v", "n": [1, 2]})
    await store.save_thread(t, ALICE)
    loaded = await store.load_thread(t.id, ALICE)
    assert loaded == t
    assert loaded.created_at.tzinfo is None  # naive stays naive


async def test_thread_round_trip_aware_datetime(store: PostgresStore) -> None:
    t = f.thread(created_at=datetime(2026, 5, 1, 12, tzinfo=UTC))
    await store.save_thread(t, ALICE)
    assert await store.load_thread(t.id, ALICE) == t


async def test_every_item_type_round_trips(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE)
    items = f.all_item_types(tid)
    for item in items:
        await store.add_thread_item(tid, item, ALICE)
    for item in items:
        assert await store.load_item(tid, item.id, ALICE) == item
    assert await _all_items(store, tid, ALICE) == items
    assert await _all_items(store, tid, ALICE, "desc") == list(reversed(items))


async def test_attachments_round_trip(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE)
    for att in (f.file_attachment(), f.image_attachment(), f.image_attachment(tid)):
        await store.save_attachment(att, ALICE)
        assert await store.load_attachment(att.id, ALICE) == att


async def test_context_kinds_all_work(store: PostgresStore) -> None:
    for ctx in (ALICE, BOB, CAROL):
        tid = await _thread(store, ctx)
        assert (await store.load_thread(tid, ctx)).id == tid


async def test_missing_user_is_refused(store: PostgresStore) -> None:
    for ctx in (None, {}, {"user_id": ""}, DataclassCtx(""), object()):
        with pytest.raises(MissingUserError):
            await store.load_threads(10, None, "desc", ctx)


# --- upserts ------------------------------------------------------------------------------


async def test_save_thread_upserts(store: PostgresStore) -> None:
    t = f.thread()
    await store.save_thread(t, ALICE)
    t.title = "Renamed"
    t.metadata = {"x": 1}
    await store.save_thread(t, ALICE)
    assert await store.load_thread(t.id, ALICE) == t
    page = await store.load_threads(10, None, "asc", ALICE)
    assert [x.id for x in page.data] == [t.id]


async def test_save_thread_accepts_full_thread(store: PostgresStore) -> None:
    from chatkit.types import Page, Thread, ThreadMetadata

    t = Thread(id=new_id("thread"), created_at=datetime.now(), items=Page())
    await store.save_thread(t, ALICE)
    loaded = await store.load_thread(t.id, ALICE)
    assert loaded == ThreadMetadata(**t.model_dump(exclude={"items"}))


async def test_save_item_upserts_and_keeps_position(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE)
    a, b = f.user_message(tid, "a", f.T0), f.user_message(tid, "b", f.T0)
    await store.add_thread_item(tid, a, ALICE)
    await store.add_thread_item(tid, b, ALICE)
    a2 = a.model_copy(update={"quoted_text": "edited"})
    await store.save_item(tid, a2, ALICE)
    assert [i for i in await _all_items(store, tid, ALICE)] == [a2, b]


async def test_add_thread_item_idempotent(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE)
    item = f.user_message(tid)
    await store.add_thread_item(tid, item, ALICE)
    await store.add_thread_item(tid, item, ALICE)
    page = await store.load_thread_items(tid, None, 10, "asc", ALICE)
    assert page.data == [item]


async def test_add_item_to_missing_thread_is_not_found(store: PostgresStore) -> None:
    with pytest.raises(NotFoundError):
        await store.add_thread_item("thr_nope", f.user_message("thr_nope"), ALICE)


def _structured(tid: str) -> StructuredInputItem:
    [item] = [i for i in f.all_item_types(tid) if isinstance(i, StructuredInputItem)]
    return item


async def test_add_thread_item_never_replaces_a_different_item(store: PostgresStore) -> None:
    """Issue 19 (5): a responder yielding an id again must not undo the user's answer."""
    tid = await _thread(store, ALICE)
    pending = _structured(tid)
    await store.add_thread_item(tid, pending, ALICE)
    answered = pending.model_copy(deep=True)
    answered.status = "answered"
    answered.inputs[1].answer = StructuredInputAnswer(values=["because"])
    await store.save_item(tid, answered, ALICE)  # the SDK's threads.add_structured_input

    with pytest.raises(ItemConflictError):
        await store.add_thread_item(tid, pending, ALICE)
    # another type under the id is refused alike
    other = f.user_message(tid).model_copy(update={"id": pending.id})
    with pytest.raises(ItemConflictError):
        await store.add_thread_item(tid, other, ALICE)
    assert await _all_items(store, tid, ALICE) == [answered]

    # a retry of what is stored stays harmless, and save_item still replaces
    await store.add_thread_item(tid, answered, ALICE)
    await store.save_item(tid, pending, ALICE)
    assert await _all_items(store, tid, ALICE) == [pending]


async def test_a_resumed_workflow_is_added_again(store: PostgresStore) -> None:
    """The SDK's stream_agent_response resumes the thread's last workflow and adds it again
    with its new tasks (add_thread_item, not save_item): that one replacement is allowed."""
    tid = await _thread(store, ALICE)
    [workflow] = [i for i in f.all_item_types(tid) if isinstance(i, WorkflowItem)]
    await store.add_thread_item(tid, workflow, ALICE)
    resumed = workflow.model_copy(deep=True)
    resumed.workflow.tasks.append(ThoughtTask(content="more thinking"))
    await store.add_thread_item(tid, resumed, ALICE)
    assert await _all_items(store, tid, ALICE) == [resumed]
    with pytest.raises(ItemConflictError):  # but nothing else takes a workflow's id
        await store.add_thread_item(
            tid, _structured(tid).model_copy(update={"id": workflow.id}), ALICE
        )


async def test_an_attachment_belongs_to_the_first_thread_that_sends_it(
    store: PostgresStore,
) -> None:
    """Issue 19 (3): saved for a second thread, an attachment would go when that thread is
    deleted, although the first thread's message still shows it."""
    t1, t2 = await _thread(store, ALICE), await _thread(store, ALICE)
    att = f.file_attachment()
    await store.save_attachment(att, ALICE)  # attachments.create: not sent yet
    sent = att.model_copy(update={"thread_id": t1})
    await store.save_attachment(sent, ALICE)
    await store.save_attachment(sent, ALICE)  # sent again in its own thread
    for elsewhere in (att.model_copy(update={"thread_id": t2}), att):
        with pytest.raises(AttachmentInUseError):
            await store.save_attachment(elsewhere, ALICE)
    assert await store.load_attachment(att.id, ALICE) == sent

    await store.delete_thread(t2, ALICE)
    assert await store.load_attachment(att.id, ALICE) == sent
    await store.delete_thread(t1, ALICE)
    with pytest.raises(NotFoundError):
        await store.load_attachment(att.id, ALICE)


async def test_two_threads_sending_one_attachment_at_once(store: PostgresStore) -> None:
    threads = [await _thread(store, ALICE) for _ in range(6)]
    att = f.image_attachment()
    await store.save_attachment(att, ALICE)
    results = await asyncio.gather(
        *(store.save_attachment(att.model_copy(update={"thread_id": t}), ALICE) for t in threads),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, AttachmentInUseError)]
    assert len(refused) == len(threads) - 1 and results.count(None) == 1
    winner = threads[results.index(None)]
    assert (await store.load_attachment(att.id, ALICE)).thread_id == winner


async def test_an_attachment_a_message_shows_is_not_deleted(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE)
    shown, unsent, stale = f.image_attachment(), f.file_attachment(), f.file_attachment()
    for att in (shown, unsent, stale):
        await store.save_attachment(att, ALICE)
    # as the SDK sends a message: the attachment saved with its thread, then the message
    shown = shown.model_copy(update={"thread_id": tid})
    await store.save_attachment(shown, ALICE)
    message = f.user_message(tid).model_copy(update={"attachments": [shown]})
    await store.add_thread_item(tid, message, ALICE)
    # a send that failed after saving the attachment: in the thread, but in no message
    await store.save_attachment(stale.model_copy(update={"thread_id": tid}), ALICE)

    with pytest.raises(AttachmentInUseError):
        await store.delete_attachment(shown.id, ALICE)
    assert await store.load_attachment(shown.id, ALICE) == shown
    for att in (unsent, stale):
        await store.delete_attachment(att.id, ALICE)
        with pytest.raises(NotFoundError):
            await store.load_attachment(att.id, ALICE)
    await store.delete_attachment(shown.id, BOB)  # another user's: a no-op, as if missing
    # once no message shows it (a retry removed the message), it may go
    await store.delete_thread_item(tid, message.id, ALICE)
    await store.delete_attachment(shown.id, ALICE)
    with pytest.raises(NotFoundError):
        await store.load_attachment(shown.id, ALICE)


# --- deletes and cascades -----------------------------------------------------------------


async def test_delete_thread_cascades(store: PostgresStore, engine) -> None:  # type: ignore[no-untyped-def]
    tid = await _thread(store, ALICE)
    items = f.all_item_types(tid)
    for item in items:
        await store.add_thread_item(tid, item, ALICE)
    att = f.file_attachment(tid)
    await store.save_attachment(att, ALICE)
    await store.save_feedback(tid, [items[1].id], "positive", ALICE)
    await store.delete_thread(tid, ALICE)
    with pytest.raises(NotFoundError):
        await store.load_thread(tid, ALICE)
    with pytest.raises(NotFoundError):
        await store.load_item(tid, items[0].id, ALICE)
    with pytest.raises(NotFoundError):
        await store.load_attachment(att.id, ALICE)
    async with store.connection() as conn:
        for table in ("chatkit_items", "chatkit_feedback", "chatkit_attachments"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0


async def test_delete_missing_thread_is_a_no_op(store: PostgresStore) -> None:
    """As in the SDK's reference store; the HTTP layer answers 404 before calling it."""
    tid = await _thread(store, ALICE)
    await store.delete_thread("thr_missing", ALICE)
    await store.delete_thread(tid, ALICE)
    await store.delete_thread(tid, ALICE)  # again: still no error
    with pytest.raises(NotFoundError):
        await store.load_thread(tid, ALICE)


async def test_delete_item(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE)
    a, b = f.user_message(tid), f.user_message(tid)
    await store.add_thread_item(tid, a, ALICE)
    await store.add_thread_item(tid, b, ALICE)
    await store.delete_thread_item(tid, a.id, ALICE)
    await store.delete_thread_item(tid, "msg_never_there", ALICE)  # no-op
    assert await _all_items(store, tid, ALICE) == [b]


async def test_delete_attachment(store: PostgresStore) -> None:
    att = f.image_attachment()
    await store.save_attachment(att, ALICE)
    await store.delete_attachment(att.id, ALICE)
    with pytest.raises(NotFoundError):
        await store.load_attachment(att.id, ALICE)
    # The SDK's attachments.delete may reach here after the row is gone: a no-op.
    await store.delete_attachment(att.id, ALICE)
    await store.delete_attachment("atc_never_there", ALICE)


# --- pagination ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_items_pages_across_equal_timestamps(store: PostgresStore, order: str) -> None:
    tid = await _thread(store, ALICE)
    # 25 items share one timestamp, framed by an earlier and a later one.
    items = [f.user_message(tid, "first", f.T0 - timedelta(seconds=1))]
    items += [f.user_message(tid, f"same {i}", f.T0) for i in range(25)]
    items += [f.user_message(tid, "last", f.T0 + timedelta(seconds=1))]
    for item in items:
        await store.add_thread_item(tid, item, ALICE)
    expected = items if order == "asc" else list(reversed(items))
    for limit in (1, 2, 3, 7, 26, 27, 100):
        got = await _all_items(store, tid, ALICE, order, limit)
        assert [i.id for i in got] == [i.id for i in expected], limit


async def test_items_ordered_by_created_at_not_insertion(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE)
    late, early = (
        f.user_message(tid, "late", f.T0),
        f.user_message(tid, "early", f.T0 - timedelta(1)),
    )
    await store.add_thread_item(tid, late, ALICE)
    await store.add_thread_item(tid, early, ALICE)
    assert [i.id for i in await _all_items(store, tid, ALICE)] == [early.id, late.id]


async def test_page_fields(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE)
    items = [f.user_message(tid, str(i), f.T0 + timedelta(seconds=i)) for i in range(5)]
    for item in items:
        await store.add_thread_item(tid, item, ALICE)
    p1 = await store.load_thread_items(tid, None, 2, "asc", ALICE)
    assert (p1.has_more, p1.after, [i.id for i in p1.data]) == (
        True,
        items[1].id,
        [i.id for i in items[:2]],
    )
    p3 = await store.load_thread_items(tid, items[3].id, 2, "asc", ALICE)
    assert (p3.has_more, p3.after, [i.id for i in p3.data]) == (False, None, [items[4].id])
    end = await store.load_thread_items(tid, items[4].id, 2, "asc", ALICE)
    assert (end.has_more, end.after, end.data) == (False, None, [])
    d = await store.load_thread_items(tid, None, 1, "desc", ALICE)
    assert [i.id for i in d.data] == [items[4].id] and d.has_more
    empty = await store.load_thread_items(tid, None, 0 + 5, "asc", {"user_id": "nobody"})
    assert (empty.data, empty.has_more, empty.after) == ([], False, None)


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_last_page_has_no_cursor(store: PostgresStore, order: str) -> None:
    """The SDK's contract for both lists: ``after`` is the last id while ``has_more``, then None
    (also when the last page is exactly full)."""
    tids = [await _thread(store, ALICE, created_at=f.T0 + timedelta(seconds=i)) for i in range(4)]
    items = [f.user_message(tids[0], str(i), f.T0 + timedelta(seconds=i)) for i in range(4)]
    for item in items:
        await store.add_thread_item(tids[0], item, ALICE)
    threads_in_order = tids if order == "asc" else tids[::-1]
    items_in_order = [i.id for i in (items if order == "asc" else items[::-1])]

    t1 = await store.load_threads(2, None, order, ALICE)
    assert (t1.has_more, t1.after) == (True, threads_in_order[1])
    t2 = await store.load_threads(2, t1.after, order, ALICE)
    assert ([t.id for t in t2.data], t2.has_more, t2.after) == (threads_in_order[2:], False, None)
    whole = await store.load_threads(4, None, order, ALICE)
    assert (len(whole.data), whole.has_more, whole.after) == (4, False, None)

    i1 = await store.load_thread_items(tids[0], None, 3, order, ALICE)
    assert (i1.has_more, i1.after) == (True, items_in_order[2])
    i2 = await store.load_thread_items(tids[0], i1.after, 3, order, ALICE)
    assert ([i.id for i in i2.data], i2.has_more, i2.after) == (items_in_order[3:], False, None)
    exact = await store.load_thread_items(tids[0], None, 4, order, ALICE)
    assert (len(exact.data), exact.has_more, exact.after) == (4, False, None)


async def test_unknown_cursor_is_not_found(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE)
    await store.add_thread_item(tid, f.user_message(tid), ALICE)
    with pytest.raises(NotFoundError):
        await store.load_thread_items(tid, "msg_unknown", 10, "asc", ALICE)
    with pytest.raises(NotFoundError):
        await store.load_threads(10, "thr_unknown", "desc", ALICE)


async def test_bad_limit_and_order(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE)
    for limit in (0, -5):
        with pytest.raises(InvalidInputError):
            await store.load_thread_items(tid, None, limit, "asc", ALICE)
        with pytest.raises(InvalidInputError):
            await store.load_threads(limit, None, "asc", ALICE)
    with pytest.raises(InvalidInputError):
        await store.load_threads(10, None, "sideways", ALICE)
    huge = await store.load_threads(10**9, None, "asc", ALICE)
    assert [t.id for t in huge.data] == [tid]


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_threads_pagination(store: PostgresStore, order: str) -> None:
    ids = []
    for i in range(12):
        # pairs of threads share a timestamp
        ids.append(await _thread(store, ALICE, created_at=f.T0 + timedelta(seconds=i // 2)))
    await _thread(store, BOB)
    expected = ids if order == "asc" else list(reversed(ids))
    for limit in (1, 5, 12, 50):
        got: list[str] = []
        after = None
        while True:
            page = await store.load_threads(limit, after, order, ALICE)
            got += [t.id for t in page.data]
            if not page.has_more:
                assert page.after is None
                break
            assert page.after == page.data[-1].id
            after = page.after
        assert got == expected


async def test_deep_page_uses_index_range_scan(store: PostgresStore) -> None:
    """The keyset query must not read the rows before the cursor (no offset, no sort)."""
    tid = await _thread(store, ALICE)
    async with store.connection() as conn:
        await conn.execute(
            "INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data) "
            "SELECT $1, $2, 'msg_' || g, $3::timestamptz + g * interval '1 ms', 'user_message', '{}'::jsonb "
            "FROM generate_series(1, 20000) g",
            "alice",
            tid,
            datetime(2026, 1, 1, tzinfo=UTC),
        )
        await conn.execute("ANALYZE chatkit_items")
        from app.pg.store import _ITEM_PAGES

        for order in ("asc", "desc"):
            plan = await conn.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + _ITEM_PAGES[order].after,
                "alice",
                tid,
                "msg_10000",
                21,
            )
            import json

            text = plan  # EXPLAIN's JSON, as text (plain asyncpg decodes no json)
            assert "ix_chatkit_items_user_id_thread_id_created_at_seq" in text
            # Rows read from the index: the page (plus one), not the 10,000 before it.
            scans = [
                n
                for n in _walk(json.loads(text)[0]["Plan"])
                if n.get("Index Name") == "ix_chatkit_items_user_id_thread_id_created_at_seq"
            ]
            assert scans and all(n["Actual Rows"] <= 21 for n in scans), text
            sorts = [n for n in _walk(json.loads(text)[0]["Plan"]) if n["Node Type"] == "Sort"]
            assert all(n["Actual Rows"] <= 21 for n in sorts), text


def _walk(node: dict) -> list[dict]:  # type: ignore[type-arg]
    out = [node]
    for child in node.get("Plans", []):
        out += _walk(child)
    return out


# --- isolation between users --------------------------------------------------------------


async def test_other_users_objects_look_missing(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE, title="alice's")
    items = f.all_item_types(tid)
    for item in items:
        await store.add_thread_item(tid, item, ALICE)
    att = f.image_attachment(tid)
    await store.save_attachment(att, ALICE)
    await store.save_feedback(tid, [items[1].id], "negative", ALICE)

    with pytest.raises(NotFoundError):
        await store.load_thread(tid, BOB)
    with pytest.raises(NotFoundError):
        await store.load_item(tid, items[0].id, BOB)
    with pytest.raises(NotFoundError):
        await store.load_attachment(att.id, BOB)
    await store.delete_thread(tid, BOB)  # a no-op for Bob (idempotent deletes)
    await store.delete_attachment(att.id, BOB)
    with pytest.raises(NotFoundError):
        await store.add_thread_item(tid, f.user_message(tid, "intrusion"), BOB)
    with pytest.raises(NotFoundError):
        await store.save_item(tid, items[0].model_copy(update={"thread_id": tid}), BOB)
    with pytest.raises(NotFoundError):
        await store.save_feedback(tid, [items[1].id], "positive", BOB)
    with pytest.raises(NotFoundError):
        await store.load_thread_items(tid, items[0].id, 10, "asc", BOB)
    # Bob attaching an upload of his own to Alice's thread is refused too.
    with pytest.raises(NotFoundError):
        await store.save_attachment(f.file_attachment(tid), BOB)
    await store.delete_thread_item(tid, items[0].id, BOB)  # no-op for Bob

    empty = await store.load_thread_items(tid, None, 10, "asc", BOB)
    assert (empty.data, empty.has_more) == ([], False)
    assert (await store.load_threads(10, None, "desc", BOB)).data == []
    assert await store.load_feedback(tid, BOB) == {}

    # Alice's data is untouched by all of the above.
    assert (await store.load_thread(tid, ALICE)).title == "alice's"
    assert await _all_items(store, tid, ALICE) == items
    assert await store.load_attachment(att.id, ALICE) == att
    assert await store.load_feedback(tid, ALICE) == {items[1].id: "negative"}


async def test_same_ids_for_two_users_never_touch_each_other(store: PostgresStore) -> None:
    t = f.thread(title="alice")
    await store.save_thread(t, ALICE)
    await store.save_thread(t.model_copy(update={"title": "bob"}), BOB)
    item = f.user_message(t.id, "alice text")
    await store.add_thread_item(t.id, item, ALICE)
    await store.add_thread_item(t.id, item.model_copy(update={"content": []}), BOB)
    att = f.file_attachment()
    await store.save_attachment(att, ALICE)
    await store.save_attachment(att.model_copy(update={"name": "bob.txt"}), BOB)
    await store.delete_thread(t.id, BOB)

    assert (await store.load_thread(t.id, ALICE)).title == "alice"
    assert await store.load_item(t.id, item.id, ALICE) == item
    assert (await store.load_attachment(att.id, ALICE)).name == "report.pdf"
    assert (await store.load_attachment(att.id, BOB)).name == "bob.txt"


# --- feedback, ids, bad input -------------------------------------------------------------


async def test_feedback_replaces(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE)
    a, b = f.user_message(tid), f.user_message(tid)
    await store.add_thread_item(tid, a, ALICE)
    await store.add_thread_item(tid, b, ALICE)
    await store.save_feedback(tid, [a.id, b.id], "positive", ALICE)
    await store.save_feedback(tid, [b.id, b.id], "negative", ALICE)
    assert await store.load_feedback(tid, ALICE) == {a.id: "positive", b.id: "negative"}
    with pytest.raises(NotFoundError):
        await store.save_feedback(tid, ["msg_missing"], "positive", ALICE)
    with pytest.raises(InvalidInputError):
        await store.save_feedback(tid, [a.id], "meh", ALICE)  # type: ignore[arg-type]
    await store.delete_thread_item(tid, a.id, ALICE)
    assert await store.load_feedback(tid, ALICE) == {b.id: "negative"}


def test_generated_ids_keep_prefixes_and_entropy(store: PostgresStore) -> None:
    t = f.thread()
    for kind, prefix in [
        ("message", "msg"),
        ("tool_call", "tc"),
        ("workflow", "wf"),
        ("task", "tsk"),
        ("sdk_hidden_context", "shcx"),
    ]:
        ident = store.generate_item_id(kind, t, ALICE)  # type: ignore[arg-type]
        assert re.fullmatch(prefix + r"_[0-9a-f]{32}", ident), ident
    assert re.fullmatch(r"thr_[0-9a-f]{32}", store.generate_thread_id(ALICE))
    ids = {store.generate_thread_id(ALICE) for _ in range(100_000)}
    assert len(ids) == 100_000


async def test_nul_character_is_invalid_input_and_stores_nothing(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE)
    with pytest.raises(InvalidInputError):
        await store.add_thread_item(tid, f.user_message(tid, "bad\x00text"), ALICE)
    with pytest.raises(InvalidInputError):
        await store.save_thread(f.thread(title="nul\x00"), ALICE)
    assert (await store.load_thread_items(tid, None, 10, "asc", ALICE)).data == []
    # the pooled connection is still healthy
    assert (await store.load_thread(tid, ALICE)).id == tid


async def test_concurrent_writes_to_one_thread(store: PostgresStore) -> None:
    tid = await _thread(store, ALICE)
    items = [f.user_message(tid, str(i), f.T0) for i in range(40)]
    await asyncio.gather(*(store.add_thread_item(tid, i, ALICE) for i in items))
    got = await _all_items(store, tid, ALICE, limit=9)
    assert sorted(i.id for i in got) == sorted(i.id for i in items)
    assert len({i.id for i in got}) == 40


async def test_the_pools_sessions_plan_generically(store: PostgresStore) -> None:
    """On one node every connection of the pool runs its prepared statements with generic
    plans (app.pg.pool): left to choose, PostgreSQL re-planned the page queries on every call."""
    async with store.connection() as conn:
        assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
