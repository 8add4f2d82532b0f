"""Another user's threads and items answer exactly like missing ones: 404, in every operation,
before any stream starts, and nothing of the owner's changes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from chatkit.types import ClientToolCallItem, StructuredInputItem, WidgetItem

from app.pg.store import PostgresStore
from tests.conftest import MakeClient
from tests.harness import factories as f
from tests.harness.chatkit_client import ChatKitClient, done_items, error_text, user_input

ALICE = {"user_id": "alice"}
ACTION = {"type": "noop", "payload": {}}


def _without_request_id(body: dict[str, Any]) -> dict[str, Any]:
    error = dict(body["error"])
    error.pop("request_id", None)
    return {"error": error}


async def _alices_world(client: ChatKitClient, store: PostgresStore) -> dict[str, str]:
    thread_id, events = await client.create_thread("Alice's secret plans")
    (question,) = done_items(events, "user_message")
    (reply,) = done_items(events, "assistant_message")
    thread = await store.load_thread(thread_id, ALICE)
    later = thread.created_at + timedelta(seconds=30)
    samples = f.all_item_types(thread_id, base=later)
    widget = next(i for i in samples if isinstance(i, WidgetItem))
    structured = next(i for i in samples if isinstance(i, StructuredInputItem))
    tool_call = next(i for i in samples if isinstance(i, ClientToolCallItem)).model_copy(
        update={"status": "pending", "output": None, "created_at": later + timedelta(minutes=1)}
    )
    for item in (widget, structured, tool_call):
        await store.add_thread_item(thread_id, item, ALICE)
    attachment = f.file_attachment()
    await store.save_attachment(attachment, ALICE)
    return {
        "thread": thread_id,
        "question": question["id"],
        "reply": reply["id"],
        "widget": widget.id,
        "structured": structured.id,
        "attachment": attachment.id,
    }


def _operations(ids: dict[str, str], bobs_thread: str) -> list[tuple[str, dict[str, Any]]]:
    t = ids["thread"]
    return [
        ("threads.get_by_id", {"thread_id": t}),
        ("threads.update", {"thread_id": t, "title": "pwned"}),
        ("threads.delete", {"thread_id": t}),
        ("items.list", {"thread_id": t}),
        ("items.feedback", {"thread_id": t, "item_ids": [ids["reply"]], "kind": "negative"}),
        ("threads.add_user_message", {"thread_id": t, "input": user_input("hi")}),
        ("threads.retry_after_item", {"thread_id": t, "item_id": ids["question"]}),
        ("threads.add_client_tool_output", {"thread_id": t, "result": {"x": 1}}),
        (
            "threads.add_structured_input",
            {"thread_id": t, "item_id": ids["structured"], "input": {"answers": {}}},
        ),
        ("threads.custom_action", {"thread_id": t, "item_id": ids["widget"], "action": ACTION}),
        (
            "threads.sync_custom_action",
            {"thread_id": t, "item_id": ids["widget"], "action": ACTION},
        ),
        ("threads.list", {"after": t}),
        ("attachments.delete", {"attachment_id": ids["attachment"]}),
        # Bob's own thread, but Alice's item or attachment inside the request:
        ("items.list", {"thread_id": bobs_thread, "after": ids["reply"]}),
        ("threads.retry_after_item", {"thread_id": bobs_thread, "item_id": ids["question"]}),
        (
            "threads.add_user_message",
            {"thread_id": bobs_thread, "input": user_input("hi", attachments=[ids["attachment"]])},
        ),
        ("threads.create", {"input": user_input("hi", attachments=[ids["attachment"]])}),
    ]


def _as_missing(value: Any, ids: dict[str, str]) -> Any:
    """The same request naming ids that exist for nobody."""
    if isinstance(value, dict):
        return {k: _as_missing(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_missing(v, ids) for v in value]
    if isinstance(value, str) and value in ids.values():
        return value.split("_")[0] + "_00000000000000000000000000000000"
    return value


async def test_other_users_objects_are_404_everywhere(
    make_client: MakeClient, store: PostgresStore
) -> None:
    client = await make_client()
    ids = await _alices_world(client, store)
    bobs_thread, _ = await client.create_thread("Bob's own thread", user="bob")
    before = (await store.load_thread_items(ids["thread"], None, 100, "asc", ALICE)).data

    for type_, params in _operations(ids, bobs_thread):
        response = await client.request(type_, params, user="bob")
        assert response.status_code == 404, (type_, params, response.text)
        assert response.headers["content-type"].startswith("application/json"), type_
        assert response.json()["error"]["code"] == "not_found", type_
        assert "alice" not in error_text(response).lower()
        # Exactly the answer a missing object gets.
        missing = await client.request(type_, _as_missing(params, ids), user="bob")
        assert missing.status_code == 404, (type_, missing.text)
        assert _without_request_id(missing.json()) == _without_request_id(response.json()), type_

    # Alice's data is untouched.
    thread = await store.load_thread(ids["thread"], ALICE)
    assert thread.title == "Alice's secret plans"
    after = (await store.load_thread_items(ids["thread"], None, 100, "asc", ALICE)).data
    assert after == before
    assert await store.load_feedback(ids["thread"], ALICE) == {}
    assert (await store.load_attachment(ids["attachment"], ALICE)).thread_id is None
    bobs_items = (
        await store.load_thread_items(bobs_thread, None, 100, "asc", {"user_id": "bob"})
    ).data
    assert [i.type for i in bobs_items] == ["user_message", "assistant_message"]
    # Bob's listing never shows Alice's thread.
    listed = await client.call("threads.list", {}, user="bob")
    assert [t["id"] for t in listed["data"]] == [bobs_thread]
