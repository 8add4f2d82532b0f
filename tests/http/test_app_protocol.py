"""The ChatKit protocol end to end through the ASGI app, against the real PostgreSQL store."""

from __future__ import annotations

import inspect
from datetime import timedelta

from agents.testing import ScriptedModel, assistant_message

from app.background import TaskRegistry
from app.chat.server import FeedbackStore
from app.chat.settle import SettledWrites
from app.observability import Metrics
from app.pg.metered import MeteredStore
from app.pg.store import PostgresStore
from tests.conftest import MakeClient
from tests.harness import factories as f
from tests.harness.chatkit_client import assistant_text, done_items, of_type, user_input

ALICE = {"user_id": "alice"}


async def test_threads_create_streams_the_whole_exchange(
    make_client: MakeClient, store: PostgresStore
) -> None:
    client = await make_client(model=ScriptedModel([[assistant_message("Hi! How can I help?")]]))
    thread_id, events = await client.create_thread("Hello")
    assert [e["type"] for e in events] == [
        "thread.created",
        "thread.item.done",  # the user message
        "stream_options",
        "thread.item.added",
        "thread.item.updated",  # content part added
        "thread.item.updated",  # text delta
        "thread.item.updated",  # content part done
        "thread.item.done",  # the assistant message
        "thread.updated",  # the title
    ]
    assert events[2]["stream_options"] == {"allow_cancel": True}
    (user_message,) = done_items(events, "user_message")
    assert user_message["content"] == [{"type": "input_text", "text": "Hello"}]
    assert events[-1]["thread"]["title"] == "Hello"

    thread = await store.load_thread(thread_id, ALICE)
    assert thread.title == "Hello"
    items = (await store.load_thread_items(thread_id, None, 10, "asc", ALICE)).data
    assert [i.type for i in items] == ["user_message", "assistant_message"]
    assert assistant_text(items[1].model_dump()) == "Hi! How can I help?"


async def test_add_user_message_keeps_the_conversation(make_client: MakeClient) -> None:
    client = await make_client(
        model=ScriptedModel([[assistant_message("One.")], [assistant_message("Two.")]])
    )
    thread_id, _ = await client.create_thread("First")
    events = await client.send(thread_id, "Second")
    assert [assistant_text(i) for i in done_items(events, "assistant_message")] == ["Two."]
    assert of_type(events, "thread.updated") == []  # the title was set on the first exchange
    page = await client.call("items.list", {"thread_id": thread_id, "order": "asc"})
    assert [(i["type"], i.get("content", [{}])[0].get("text")) for i in page["data"]] == [
        ("user_message", "First"),
        ("assistant_message", "One."),
        ("user_message", "Second"),
        ("assistant_message", "Two."),
    ]


async def test_threads_list_paginates(make_client: MakeClient, store: PostgresStore) -> None:
    client = await make_client()
    threads = [f.thread(created_at=f.T0 + timedelta(seconds=i), title=f"t{i}") for i in range(5)]
    for thread in threads:
        await store.save_thread(thread, ALICE)
    await store.save_thread(f.thread(title="bob's"), {"user_id": "bob"})

    seen: list[str] = []
    after = None
    pages = 0
    while True:
        params = {"limit": 2} | ({"after": after} if after else {})
        page = await client.call("threads.list", params)
        pages += 1
        seen += [t["title"] for t in page["data"]]
        assert all(t["items"] == {"data": [], "has_more": False} for t in page["data"])
        if not page["has_more"]:
            assert page.get("after") is None  # the last page carries no cursor
            break
        assert page["after"] == page["data"][-1]["id"]
        after = page["after"]
    assert seen == ["t4", "t3", "t2", "t1", "t0"]  # newest first by default
    assert pages == 3
    ascending = await client.call("threads.list", {"limit": 10, "order": "asc"})
    assert [t["title"] for t in ascending["data"]] == ["t0", "t1", "t2", "t3", "t4"]


async def test_get_by_id_returns_items_without_hidden_context(
    make_client: MakeClient, store: PostgresStore
) -> None:
    client = await make_client()
    thread_id, _ = await client.create_thread("Hello")
    thread = await store.load_thread(thread_id, ALICE)
    items = f.all_item_types(thread_id, base=thread.created_at + timedelta(seconds=10))
    for item in items:
        await store.add_thread_item(thread_id, item, ALICE)

    got = await client.call("threads.get_by_id", {"thread_id": thread_id})
    assert got["id"] == thread_id and got["title"] == "Hello"
    types = [i["type"] for i in got["items"]["data"]]
    assert types[:2] == ["user_message", "assistant_message"]
    assert "hidden_context_item" not in types and "sdk_hidden_context" not in types
    assert "widget" in types and "workflow" in types and "end_of_turn" in types
    # Integration-only attachment metadata never reaches the client.
    attachments = got["items"]["data"][2]["attachments"]
    assert attachments and all("metadata" not in a for a in attachments)


async def test_items_list_pages_in_both_orders(
    make_client: MakeClient, store: PostgresStore
) -> None:
    client = await make_client()
    thread = f.thread()
    await store.save_thread(thread, ALICE)
    messages = [f.user_message(thread.id, f"m{i}", f.T0 + timedelta(seconds=i)) for i in range(7)]
    for message in messages:
        await store.add_thread_item(thread.id, message, ALICE)
    for order, expected in (("asc", messages), ("desc", messages[::-1])):
        got: list[str] = []
        after = None
        while True:
            params = {"thread_id": thread.id, "limit": 3, "order": order}
            page = await client.call("items.list", params | ({"after": after} if after else {}))
            got += [i["id"] for i in page["data"]]
            if not page["has_more"]:
                assert page.get("after") is None
                break
            assert page["after"] == page["data"][-1]["id"]
            after = page["after"]
        assert got == [m.id for m in expected]


async def test_items_list_of_an_empty_thread(make_client: MakeClient, store: PostgresStore) -> None:
    client = await make_client()
    thread = f.thread()
    await store.save_thread(thread, ALICE)
    page = await client.call("items.list", {"thread_id": thread.id})
    assert page == {"data": [], "has_more": False}
    response = await client.request("items.list", {"thread_id": thread.id}, user="bob")
    assert response.status_code == 404


async def test_threads_update_renames(make_client: MakeClient, store: PostgresStore) -> None:
    client = await make_client()
    thread_id, _ = await client.create_thread("Hello")
    got = await client.call("threads.update", {"thread_id": thread_id, "title": "Renamed ✓"})
    assert got["title"] == "Renamed ✓"
    assert (await store.load_thread(thread_id, ALICE)).title == "Renamed ✓"


async def test_threads_delete(make_client: MakeClient, store: PostgresStore) -> None:
    client = await make_client()
    thread_id, _ = await client.create_thread("Hello")
    assert await client.call("threads.delete", {"thread_id": thread_id}) == {}
    response = await client.request("threads.get_by_id", {"thread_id": thread_id})
    assert response.status_code == 404
    assert (await store.load_threads(10, None, "desc", ALICE)).data == []


async def test_feedback_is_persisted(make_client: MakeClient, store: PostgresStore) -> None:
    client = await make_client()
    thread_id, events = await client.create_thread("Hello")
    (reply,) = done_items(events, "assistant_message")
    params = {"thread_id": thread_id, "item_ids": [reply["id"]], "kind": "positive"}
    assert await client.call("items.feedback", params) == {}
    assert await store.load_feedback(thread_id, ALICE) == {reply["id"]: "positive"}
    await client.call("items.feedback", params | {"kind": "negative"})
    assert await store.load_feedback(thread_id, ALICE) == {reply["id"]: "negative"}
    bad = await client.request("items.feedback", params | {"item_ids": ["msg_missing"]})
    assert bad.status_code == 404


async def test_retry_after_item_replaces_the_reply(
    make_client: MakeClient, store: PostgresStore
) -> None:
    model = ScriptedModel([[assistant_message("First try.")], [assistant_message("Second try.")]])
    client = await make_client(model=model)
    thread_id, events = await client.create_thread("Hello")
    (question,) = done_items(events, "user_message")
    (first,) = done_items(events, "assistant_message")

    events = await client.stream(
        "threads.retry_after_item", {"thread_id": thread_id, "item_id": question["id"]}
    )
    (second,) = done_items(events, "assistant_message")
    assert assistant_text(second) == "Second try."
    items = (await store.load_thread_items(thread_id, None, 10, "asc", ALICE)).data
    assert [i.id for i in items] == [question["id"], second["id"]]
    assert first["id"] != second["id"]
    # Retrying from something that is not a user message is a client error, before streaming.
    response = await client.request(
        "threads.retry_after_item", {"thread_id": thread_id, "item_id": second["id"]}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


async def test_client_tool_output_needs_a_pending_call(make_client: MakeClient) -> None:
    client = await make_client()
    thread_id, _ = await client.create_thread("Hello")
    response = await client.request(
        "threads.add_client_tool_output", {"thread_id": thread_id, "result": {"ok": True}}
    )
    assert response.status_code == 400
    assert "pending client tool call" in response.json()["error"]["message"]


async def test_client_tool_output_continues_the_reply(
    make_client: MakeClient, store: PostgresStore
) -> None:
    model = ScriptedModel([[assistant_message("Got your location.")]])
    client = await make_client(model=model)
    thread = f.thread()
    await store.save_thread(thread, ALICE)
    await store.add_thread_item(thread.id, f.user_message(thread.id, "Where am I?"), ALICE)
    call = f.all_item_types(thread.id)[5].model_copy(
        update={"status": "pending", "output": None, "created_at": thread.created_at + timedelta(1)}
    )
    await store.add_thread_item(thread.id, call, ALICE)

    events = await client.stream(
        "threads.add_client_tool_output", {"thread_id": thread.id, "result": {"lat": 1.5}}
    )
    assert [assistant_text(i) for i in done_items(events, "assistant_message")] == [
        "Got your location."
    ]
    saved = await store.load_item(thread.id, call.id, ALICE)
    assert saved.status == "completed" and saved.output == {"lat": 1.5}  # type: ignore[union-attr]
    outputs = [i for i in model.calls[0].input if i.get("type") == "function_call_output"]
    assert len(outputs) == 1 and "1.5" in outputs[0]["output"]


async def test_unsupported_operations_are_400(make_client: MakeClient) -> None:
    client = await make_client()
    thread_id, _ = await client.create_thread("Hello")
    action = {"type": "do.something", "payload": {}}
    # (attachments are supported since issue 5: tests/test_attachments_e2e.py)
    cases = [
        ("input.transcribe", {"audio_base64": "AAAA", "mime_type": "audio/webm"}),
        ("threads.custom_action", {"thread_id": thread_id, "action": action}),
        ("threads.sync_custom_action", {"thread_id": thread_id, "action": action}),
    ]
    for type_, params in cases:
        response = await client.request(type_, params)
        assert response.status_code == 400, (type_, response.text)
        assert response.json()["error"]["code"] == "unsupported", type_


async def test_structured_input_must_be_pending(make_client: MakeClient) -> None:
    client = await make_client()
    thread_id, events = await client.create_thread("Hello")
    (reply,) = done_items(events, "assistant_message")
    response = await client.request(
        "threads.add_structured_input",
        {"thread_id": thread_id, "item_id": reply["id"], "input": {"answers": {}}},
    )
    assert response.status_code == 400


async def test_user_input_options_are_kept(make_client: MakeClient, store: PostgresStore) -> None:
    client = await make_client()
    events = await client.stream(
        "threads.create",
        {"input": user_input("Hello", quoted_text="an earlier line")},
    )
    (message,) = done_items(events, "user_message")
    assert message["quoted_text"] == "an earlier line"


def test_the_servers_store_wrappers_define_the_optional_methods(store: PostgresStore) -> None:
    """The server wraps its store (metrics, settled writes) and asks for feedback support with
    a runtime protocol check. Since Python 3.12 that check looks attributes up statically, so
    a wrapper that only forwarded them through ``__getattr__`` made the server answer "does not
    record feedback" on 3.12+ alone; this looks them up the same way on every Python."""
    wrapped = SettledWrites(
        MeteredStore(store, Metrics().store_seconds),
        tasks=TaskRegistry(),
        retry_seconds=0,
    )
    for name in ("save_feedback", "load_feedback"):
        assert callable(inspect.getattr_static(wrapped, name)), name
    assert isinstance(wrapped, FeedbackStore)
