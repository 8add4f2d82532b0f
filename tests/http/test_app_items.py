"""A responder that yields an item under an id the thread already holds, through POST /chatkit
(issue 19, item 5).

The responder is the app's agent with a scripted model calling a plugin tool (loaded through
``CHATKIT_PLUGINS``, as operators load theirs) that streams one structured input under a fixed
id, as a responder that re-yields an item would. The store refuses a *different* item under
that id (the user's answer stays; the SDK reports the refusal as an ``error`` event and the
conflicting item never reaches the client); the *same* item again is a harmless retry.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from agents import RunContextWrapper, function_tool
from agents.testing import ScriptedModel, assistant_message, function_call
from chatkit.agents import AgentContext
from chatkit.types import StructuredInputFreeform, StructuredInputItem, ThreadItemDoneEvent

from app.chat.plugins import Plugin
from app.pg.store import PostgresStore
from tests.conftest import MakeClient
from tests.harness.chatkit_client import ChatKitClient, done_items, of_type

ALICE = {"user_id": "alice"}
ASK_ID = "si_lesson_subject"


@function_tool
async def ask_subject(ctx: RunContextWrapper[AgentContext[Any]]) -> str:
    """Ask the user which subject the lesson is for."""
    thread = ctx.context.thread
    question = StructuredInputItem(
        id=ASK_ID,
        thread_id=thread.id,
        # fixed by the thread, so asking again makes the very same item
        created_at=thread.created_at + timedelta(seconds=1),
        inputs=[StructuredInputFreeform(id="subject", question="Which subject?")],
    )
    await ctx.context.stream(ThreadItemDoneEvent(item=question))
    return "The user sees the question."


PLUGIN = Plugin(name="ask_again", tools=[ask_subject])


def asking_model() -> ScriptedModel:
    """Two turns, each calling the tool and then answering."""
    return ScriptedModel(
        [
            [function_call("ask_subject", {}, call_id="call_ask_1")],
            [assistant_message("Which subject is it for?")],
            [function_call("ask_subject", {}, call_id="call_ask_2")],
            [assistant_message("Thanks.")],
        ]
    )


async def asked(make_client: MakeClient) -> tuple[ChatKitClient, str]:
    client = await make_client(asking_model(), chatkit_plugins=[f"{__name__}:PLUGIN"])
    thread_id, events = await client.create_thread("Plan a lesson")
    [question] = done_items(events, "structured_input")
    assert (question["id"], question["status"]) == (ASK_ID, "pending")
    return client, thread_id


async def test_an_answered_question_asked_again_keeps_the_answer(
    make_client: MakeClient, store: PostgresStore
) -> None:
    client, thread_id = await asked(make_client)
    events = await client.stream(
        "threads.add_structured_input",
        {
            "thread_id": thread_id,
            "item_id": ASK_ID,
            "input": {"status": "answered", "answers": {"subject": {"values": ["Science"]}}},
        },
    )
    [replaced] = of_type(events, "thread.item.replaced")
    assert replaced["item"]["status"] == "answered"
    # the tool asked again: the store refused the pending copy and the SDK said so
    assert of_type(events, "error"), events
    assert done_items(events, "structured_input") == []

    stored = await store.load_item(thread_id, ASK_ID, ALICE)
    assert isinstance(stored, StructuredInputItem) and stored.status == "answered"
    assert stored.inputs[0].answer is not None and stored.inputs[0].answer.values == ["Science"]
    page = await client.call("items.list", {"thread_id": thread_id, "order": "asc"})
    questions = [i for i in page["data"] if i["type"] == "structured_input"]
    assert [(q["id"], q["status"]) for q in questions] == [(ASK_ID, "answered")]


async def test_the_same_question_yielded_again_is_a_harmless_retry(
    make_client: MakeClient, store: PostgresStore
) -> None:
    client, thread_id = await asked(make_client)
    events = await client.send(thread_id, "Not sure yet")
    assert of_type(events, "error") == []
    [again] = done_items(events, "structured_input")
    assert (again["id"], again["status"]) == (ASK_ID, "pending")
    assert [m["content"][0]["text"] for m in done_items(events, "assistant_message")] == ["Thanks."]
    items = (await store.load_thread_items(thread_id, None, 50, "asc", ALICE)).data
    assert [i.id for i in items if isinstance(i, StructuredInputItem)] == [ASK_ID]
