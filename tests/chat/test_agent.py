"""The agent path: scripted model, a loopback Chat Completions server, MCP tools, titles,
history, and model output the store could not hold."""

from __future__ import annotations

from typing import Any

from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from mcp.server.mcpserver import MCPServer

from app.chat.agent import TITLE_INSTRUCTIONS
from app.chat.offline_model import text_response_events
from app.pg.store import PostgresStore
from tests.conftest import MakeClient
from tests.harness.chatkit_client import assistant_text, done_items, of_type
from tests.harness.fake_openai import FakeChatCompletions, message_texts
from tests.harness.loopback import serve

ALICE = {"user_id": "alice"}


def input_texts(model_input: Any) -> list[tuple[str, str]]:
    """(role, text) of every message in a Responses-format model input."""
    out = []
    for item in model_input:
        if item.get("type", "message") != "message":
            continue
        content = item["content"]
        text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
        out.append((item["role"], text))
    return out


def streamed(*chunks: str, item_id: str = "scripted-message") -> ModelStep:
    async def events(call: Any) -> Any:
        for event in text_response_events(chunks, item_id=item_id):
            yield event

    return ModelStep.stream(events)


async def test_scripted_reply_is_streamed_and_stored(
    make_client: MakeClient, store: PostgresStore
) -> None:
    model = ScriptedModel([streamed("Hello ", "from ", "a ", "script.")])
    client = await make_client(model=model)
    thread_id, events = await client.create_thread("Hi")

    deltas = [
        e["update"]["delta"]
        for e in of_type(events, "thread.item.updated")
        if e["update"]["type"] == "assistant_message.content_part.text_delta"
    ]
    assert deltas == ["Hello ", "from ", "a ", "script."]
    (reply,) = done_items(events, "assistant_message")
    assert assistant_text(reply) == "Hello from a script."
    # The added, updated and done events of the reply all carry the one store-made id.
    added = [e["item"]["id"] for e in of_type(events, "thread.item.added")]
    updated = {e["item_id"] for e in of_type(events, "thread.item.updated")}
    assert added == [reply["id"]] and updated == {reply["id"]}
    assert reply["id"].startswith("msg_") and reply["id"] != "scripted-message"

    stored = await store.load_item(thread_id, reply["id"], ALICE)
    assert assistant_text(stored.model_dump()) == "Hello from a script."
    model.assert_complete()


async def test_second_turn_sees_first_turn(make_client: MakeClient) -> None:
    model = ScriptedModel(
        [[assistant_message("Paris is the capital.")], [assistant_message("About two million.")]]
    )
    client = await make_client(model=model, agent_instructions="You are a geography tutor.")
    thread_id, _ = await client.create_thread("What is the capital of France?")
    await client.send(thread_id, "How many people live there?")

    assert input_texts(model.calls[1].input) == [
        ("user", "What is the capital of France?"),
        ("assistant", "Paris is the capital."),
        ("user", "How many people live there?"),
    ]
    assert model.calls[0].system_instructions == "You are a geography tutor."
    page = await client.call("items.list", {"thread_id": thread_id, "order": "asc"})
    assert [i["type"] for i in page["data"]] == [
        "user_message",
        "assistant_message",
        "user_message",
        "assistant_message",
    ]
    replies = [i for i in page["data"] if i["type"] == "assistant_message"]
    # The scripted model gives both replies the same id; the server must not let the second
    # overwrite the first.
    assert [assistant_text(r) for r in replies] == ["Paris is the capital.", "About two million."]
    assert replies[0]["id"] != replies[1]["id"]


async def test_history_is_bounded(make_client: MakeClient) -> None:
    model = ScriptedModel([[assistant_message(f"Answer {n}")] for n in range(1, 4)])
    client = await make_client(model=model, history_items=3)
    thread_id, _ = await client.create_thread("Question 1")
    await client.send(thread_id, "Question 2")
    await client.send(thread_id, "Question 3")
    assert input_texts(model.calls[2].input) == [
        ("user", "Question 2"),
        ("assistant", "Answer 2"),
        ("user", "Question 3"),
    ]


async def test_locale_reaches_the_instructions(make_client: MakeClient) -> None:
    model = ScriptedModel([[assistant_message("Bonjour !")]])
    client = await make_client(model=model)
    await client.stream(
        "threads.create",
        {
            "input": {
                "content": [{"type": "input_text", "text": "Salut"}],
                "attachments": [],
                "inference_options": {},
            }
        },
        headers={"Accept-Language": "fr-CH, fr;q=0.9, en;q=0.5"},
    )
    instructions = model.calls[0].system_instructions or ""
    assert "'fr-CH'" in instructions


async def test_title_from_the_model(make_client: MakeClient, store: PostgresStore) -> None:
    model = ScriptedModel(
        [
            [assistant_message("Sure, here is a plan.")],
            [assistant_message('Title: "Weekend in Rome."')],
        ]
    )
    client = await make_client(model=model, thread_titles="model")
    thread_id, events = await client.create_thread("Plan me a weekend in Rome please")
    (updated,) = of_type(events, "thread.updated")
    assert updated["thread"]["title"] == "Weekend in Rome"
    assert (await store.load_thread(thread_id, ALICE)).title == "Weekend in Rome"
    assert model.calls[1].system_instructions == TITLE_INSTRUCTIONS
    assert input_texts(model.calls[1].input) == [("user", "Plan me a weekend in Rome please")]
    # Titles are made once: a second exchange does not ask again.
    model.enqueue([assistant_message("More.")])
    events = await client.send(thread_id, "And on Sunday?")
    assert of_type(events, "thread.updated") == []
    model.assert_complete()


async def test_title_falls_back_to_the_message(make_client: MakeClient) -> None:
    model = ScriptedModel(
        [[assistant_message("Ok.")], ModelStep.raise_error(RuntimeError("title model down"))]
    )
    client = await make_client(model=model, thread_titles="model")
    long = "Compare the three cheapest ways of getting from Lisbon to Porto with luggage"
    _, events = await client.create_thread(long)
    (updated,) = of_type(events, "thread.updated")
    title = updated["thread"]["title"]
    assert title.endswith("…") and long.startswith(title[:-1]) and len(title) <= 61


async def test_model_failure_is_a_safe_error_event(
    make_client: MakeClient, store: PostgresStore
) -> None:
    model = ScriptedModel([ModelStep.raise_error(RuntimeError("secret internal detail 42"))])
    client = await make_client(model=model)
    response = await client.request(
        "threads.create",
        {
            "input": {
                "content": [{"type": "input_text", "text": "Hi"}],
                "attachments": [],
                "inference_options": {},
            }
        },
    )
    assert response.status_code == 200
    assert "secret internal detail" not in response.text
    from tests.harness.chatkit_client import parse_sse

    events = parse_sse(response.text)
    (error,) = of_type(events, "error")
    assert error["code"] == "stream.error" and error["allow_retry"] is True
    thread_id = of_type(events, "thread.created")[0]["thread"]["id"]
    items = (await store.load_thread_items(thread_id, None, 10, "asc", ALICE)).data
    assert [i.type for i in items] == ["user_message"]


async def test_nul_from_the_model_is_replaced(
    make_client: MakeClient, store: PostgresStore
) -> None:
    model = ScriptedModel([streamed("bad\x00", "text \ud800 end")])
    client = await make_client(model=model)
    thread_id, events = await client.create_thread("Hi")
    (reply,) = done_items(events, "assistant_message")
    assert assistant_text(reply) == "bad\ufffdtext \ufffd end"
    stored = await store.load_item(thread_id, reply["id"], ALICE)
    assert assistant_text(stored.model_dump()) == "bad\ufffdtext \ufffd end"


async def test_offline_model_explains_itself(make_client: MakeClient) -> None:
    client = await make_client()  # no model, no provider settings: the offline demo model
    _, events = await client.create_thread("Tell me a joke about databases")
    (reply,) = done_items(events, "assistant_message")
    text = assistant_text(reply)
    assert "offline demo model" in text
    assert "OPENAI_API_KEY" in text and "OPENAI_BASE_URL" in text
    deltas = [e for e in of_type(events, "thread.item.updated")]
    assert len(deltas) > 20  # word by word
    (updated,) = of_type(events, "thread.updated")
    assert updated["thread"]["title"] == "Tell me a joke about databases"


async def test_chat_completions_server_two_turns(
    make_client: MakeClient, store: PostgresStore
) -> None:
    fake = FakeChatCompletions()
    async with serve(fake.app) as base:
        client = await make_client(
            openai_base_url=f"{base}/v1", model_name="fake-model", thread_titles="model"
        )
        thread_id, first = await client.create_thread("First question")
        second = await client.send(thread_id, "Second question")

    replies = []
    for events in (first, second):
        (reply,) = done_items(events, "assistant_message")
        ids = {e["item"]["id"] for e in of_type(events, "thread.item.added")}
        ids |= {e["item_id"] for e in of_type(events, "thread.item.updated")}
        assert ids == {reply["id"]}, "added/updated/done must agree on one id"
        assert reply["id"] != "__fake_id__"
        replies.append(reply)
    assert replies[0]["id"] != replies[1]["id"]

    items = (await store.load_thread_items(thread_id, None, 10, "asc", ALICE)).data
    assert [(i.type, i.id) for i in items if i.type == "assistant_message"] == [
        ("assistant_message", replies[0]["id"]),
        ("assistant_message", replies[1]["id"]),
    ]
    assert [assistant_text(r) for r in replies] == [
        "Reply number 1 from the fake server.",
        "Reply number 2 from the fake server.",
    ]
    # The second request carried the first turn.
    texts = message_texts(fake.streamed_requests[1])
    assert texts[-3:] == [
        ("user", "First question"),
        ("assistant", "Reply number 1 from the fake server."),
        ("user", "Second question"),
    ]
    assert fake.streamed_requests[0]["model"] == "fake-model"
    # The title was asked of the model (a non-streamed request).
    (updated,) = of_type(first, "thread.updated")
    assert updated["thread"]["title"] == "Fake Title"
    assert (await store.load_thread(thread_id, ALICE)).title == "Fake Title"


async def test_mcp_tool_is_called(make_client: MakeClient) -> None:
    calls: list[tuple[int, int]] = []
    tools = MCPServer("test-tools")

    @tools.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    model = ScriptedModel(
        [
            [function_call("add", {"a": 2, "b": 3}, call_id="call_add_1")],
            [assistant_message("2 + 3 = 5")],
        ]
    )
    async with serve(tools.streamable_http_app()) as base:
        client = await make_client(model=model, mcp_server_urls=[f"{base}/mcp"])
        _, events = await client.create_thread("What is 2 + 3?")

    assert calls == [(2, 3)]
    assert "add" in [tool.name for tool in model.calls[0].tools]
    outputs = [i for i in model.calls[1].input if i.get("type") == "function_call_output"]
    assert len(outputs) == 1 and outputs[0]["call_id"] == "call_add_1"
    assert "5" in str(outputs[0]["output"])
    (reply,) = done_items(events, "assistant_message")
    assert assistant_text(reply) == "2 + 3 = 5"
