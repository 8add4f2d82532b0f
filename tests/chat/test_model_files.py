"""Files in model input are bounded per request (issue 19): attachments per message limited and
collapsed, a newest-first budget of file bytes with notes for what is left out, each file read
once per reply and nothing of it left behind when the reply ends.

The service runs whole (``create_app``: JWT, /chatkit, /files, real PostgreSQL); the model is
the fake Chat Completions server on a loopback socket, whose recorded requests are exactly what
a provider would have received.
"""

from __future__ import annotations

import base64
import gc
import json
import random
import tracemalloc
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from chatkit.errors import CustomStreamError
from chatkit.types import InferenceOptions, UserMessageItem, UserMessageTextContent

from app.chat.converter import NOTE_PREFIX, AttachmentConverter
from app.chat.model_files import size_text
from app.context import RequestContext
from app.files.store import CHUNK_SIZE, PgAttachmentStore
from app.pg.store import PostgresStore
from tests.conftest import MakeClient
from tests.harness.chatkit_client import ChatKitClient, error_text, of_type, parse_sse, user_input
from tests.harness.fake_openai import FakeChatCompletions
from tests.harness.loopback import serve

ALICE = {"user_id": "alice"}
IMAGE = 300_000


def image(size: int = IMAGE, seed: int = 0) -> bytes:
    """PNG as far as the content check goes, incompressible after its signature."""
    return b"\x89PNG\r\n\x1a\n" + random.Random(seed).randbytes(size - 8)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def upload(ck: ChatKitClient, data: bytes, name: str, mime: str = "image/png") -> str:
    r = await ck.http.post("/files", files={"file": (name, data, mime)}, headers=ck.auth("alice"))
    assert r.status_code == 200, r.text
    attachment_id: str = r.json()["id"]
    return attachment_id


def user_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The content parts of a Chat Completions request's user messages, in order."""
    out: list[dict[str, Any]] = []
    for message in body["messages"]:
        if message["role"] == "user" and isinstance(message["content"], list):
            out.extend(message["content"])
    return out


def image_urls(body: dict[str, Any]) -> list[str]:
    return [p["image_url"]["url"] for p in user_parts(body) if p["type"] == "image_url"]


def notes(body: dict[str, Any]) -> list[str]:
    """The notes standing in for files (not the one naming a message's attachments)."""
    texts = [p["text"] for p in user_parts(body) if p["type"] == "text"]
    return [t for t in texts if t.startswith("[The ") and not t.startswith(NOTE_PREFIX)]


def input_images(items: list[Any]) -> list[str]:
    """The image URLs of model input items (Responses format, as the converter makes them)."""
    parts = [p for m in items for p in m.get("content", []) if isinstance(p, dict)]
    return [p["image_url"] for p in parts if p.get("type") == "input_image"]


def file_bytes_sent(body: dict[str, Any]) -> int:
    """Bytes of base64 file data the request carried (images and files)."""
    total = 0
    for part in user_parts(body):
        if part["type"] == "image_url":
            total += len(part["image_url"]["url"].split(",", 1)[1])
        elif part["type"] == "file":
            total += len(part["file"]["file_data"].split(",", 1)[1])
    return total


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeChatCompletions, str]]:
    model = FakeChatCompletions()
    async with serve(model.app) as base:
        yield model, f"{base}/v1"


async def client_for(
    make_client: MakeClient, fake: tuple[FakeChatCompletions, str], **settings: Any
) -> ChatKitClient:
    return await make_client(openai_base_url=fake[1], model_name="fake", **settings)


async def converse(ck: ChatKitClient, turns: list[list[str]]) -> str:
    """One thread, a message per entry of ``turns`` naming those attachment ids."""
    thread_id = ""
    for n, ids in enumerate(turns):
        text = f"turn {n}"
        if not thread_id:
            events = await ck.stream("threads.create", {"input": user_input(text, attachments=ids)})
            thread_id = of_type(events, "thread.created")[0]["thread"]["id"]
        else:
            events = await ck.stream(
                "threads.add_user_message",
                {"thread_id": thread_id, "input": user_input(text, attachments=ids)},
            )
        assert not of_type(events, "error"), events
    return thread_id


# --- the reproduction -----------------------------------------------------------------------


async def test_one_file_named_ten_times_in_five_messages_is_sent_once_per_request(
    make_client: MakeClient, fake: tuple[FakeChatCompletions, str], store: PostgresStore
) -> None:
    """Issue 19's reproduction: before, request n carried 10n copies of the image (50 in the
    fifth), each a fresh base64 copy; now every request carries it exactly once."""
    model, _ = fake
    ck = await client_for(make_client, fake)
    data = image()
    attachment_id = await upload(ck, data, "big.png")
    thread_id = await converse(ck, [[attachment_id] * 10] * 5)

    requests = model.streamed_requests
    assert len(requests) == 5
    for n, body in enumerate(requests):
        assert image_urls(body) == [f"data:image/png;base64,{b64(data)}"]
        assert file_bytes_sent(body) == len(b64(data))
        # the older messages say where the image is instead of repeating it
        assert (
            notes(body)
            == [
                '[The image "big.png" is attached again later in this conversation; '
                "it is shown there.]"
            ]
            * n
        )
    # the repeats were collapsed before the message was stored
    items = (await store.load_thread_items(thread_id, None, 20, "asc", ALICE)).data
    messages = [i for i in items if isinstance(i, UserMessageItem)]
    assert [[a.id for a in m.attachments] for m in messages] == [[attachment_id]] * 5


# --- limits ---------------------------------------------------------------------------------


async def test_more_distinct_attachments_than_allowed_is_a_400_before_any_work(
    make_client: MakeClient, fake: tuple[FakeChatCompletions, str]
) -> None:
    model, _ = fake
    ck = await client_for(make_client, fake, max_attachments_per_message=3)
    ids = [await upload(ck, image(1000, seed=n), f"p{n}.png") for n in range(4)]

    r = await ck.request("threads.create", {"input": user_input("four", attachments=ids)})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"] == "A message can carry at most 3 attachments."
    assert error["field"] == "params.input.attachments"
    assert "p0.png" not in error_text(r) and ids[0] not in error_text(r)
    assert (await ck.call("threads.list", {}))["data"] == []
    assert model.requests == []

    # three distinct files, however often named, are fine (and stored once each, in order)
    named = [ids[2], ids[0], ids[2], ids[1], ids[0]] * 20
    thread_id = await converse(ck, [named])
    thread = await ck.call("threads.get_by_id", {"thread_id": thread_id})
    [message] = [i for i in thread["items"]["data"] if i["type"] == "user_message"]
    assert [a["id"] for a in message["attachments"]] == [ids[2], ids[0], ids[1]]
    assert len(image_urls(model.streamed_requests[0])) == 3


async def test_a_caller_skipping_the_precheck_gets_a_stream_error(
    make_client: MakeClient, fake: tuple[FakeChatCompletions, str], store: PostgresStore
) -> None:
    """``ChatKitPgServer.process`` without the endpoint's precheck (an embedding app): the
    limit still holds, as the SDK's stream error, before any attachment is loaded or the
    model asked."""
    model, _ = fake
    ck = await client_for(make_client, fake, max_attachments_per_message=1)
    ids = [await upload(ck, image(1000, seed=n), f"p{n}.png") for n in range(2)]
    server = ck.app.state.server
    body = {"type": "threads.create", "params": {"input": user_input("two", attachments=ids)}}
    result = await server.process(json.dumps(body), RequestContext(user_id="alice"))
    chunks: list[bytes] = []
    with pytest.raises(CustomStreamError) as raised:
        async for chunk in result:
            chunks.append(chunk)
    assert raised.value.message == "A message can carry at most 1 attachment."
    assert raised.value.allow_retry is False
    assert [e["type"] for e in parse_sse(b"".join(chunks).decode())] == ["thread.created"]
    assert model.requests == []
    [thread] = (await store.load_threads(10, None, "desc", ALICE)).data
    assert (await store.load_thread_items(thread.id, None, 10, "asc", ALICE)).data == []


# --- the budget -----------------------------------------------------------------------------


async def test_the_budget_keeps_the_newest_files_and_notes_the_omitted_ones(
    make_client: MakeClient, fake: tuple[FakeChatCompletions, str]
) -> None:
    model, _ = fake
    budget = 2 * IMAGE + IMAGE // 2  # two images and a bit
    ck = await client_for(make_client, fake, model_input_file_bytes=budget)
    images = [image(seed=n) for n in range(4)]
    ids = [await upload(ck, data, f"p{n}.png") for n, data in enumerate(images)]
    notes_txt = await upload(ck, b"remember the milk\n", "notes.txt", "text/plain")
    await converse(ck, [[ids[0]], [ids[1]], [ids[2]], [ids[3], notes_txt]])

    first, _, third, last = model.streamed_requests
    assert image_urls(first) == [f"data:image/png;base64,{b64(images[0])}"]
    assert notes(first) == []
    # the third request: p0 left out, p1 and p2 sent, oldest first as in the conversation
    assert image_urls(third) == [f"data:image/png;base64,{b64(d)}" for d in images[1:3]]
    # the last: p2 and p3 (and the text file) fit, p0 and p1 are notes in their messages
    assert image_urls(last) == [f"data:image/png;base64,{b64(d)}" for d in images[2:]]
    omitted = [
        f'[The image "p{n}.png" that the user attached here was omitted: this request can '
        f"carry only {size_text(budget)} of files, and newer ones come first. Ask the user "
        "to attach it again if you need it.]"
        for n in (0, 1)
    ]
    assert notes(last) == omitted
    texts = [p["text"] for p in user_parts(last) if p["type"] == "text"]
    assert any("remember the milk" in t and '"notes.txt"' in t for t in texts)
    for body in model.streamed_requests:
        assert file_bytes_sent(body) <= budget * 4 / 3 + 4


async def test_a_zero_budget_sends_no_file_bytes_at_all(
    make_client: MakeClient, fake: tuple[FakeChatCompletions, str]
) -> None:
    model, _ = fake
    ck = await client_for(make_client, fake, model_input_file_bytes=0)
    attachment_id = await upload(ck, image(), "big.png")
    await converse(ck, [[attachment_id]])
    [body] = model.streamed_requests
    assert image_urls(body) == [] and file_bytes_sent(body) == 0
    assert len(notes(body)) == 1 and '"big.png"' in notes(body)[0]


async def test_repeats_stored_before_the_limit_are_collapsed_in_the_history(
    make_client: MakeClient, fake: tuple[FakeChatCompletions, str], store: PostgresStore
) -> None:
    """Threads written before duplicates were collapsed still carry them: the model sees each
    file once."""
    model, _ = fake
    ck = await client_for(make_client, fake)
    data = image()
    attachment_id = await upload(ck, data, "big.png")
    thread_id = await converse(ck, [[]])
    attachment = await store.load_attachment(attachment_id, ALICE)
    await store.add_thread_item(
        thread_id,
        UserMessageItem(
            id="msg_legacy",
            thread_id=thread_id,
            content=[UserMessageTextContent(text="old")],
            attachments=[attachment] * 30,
            inference_options=InferenceOptions(),
            created_at=datetime.now(),
        ),
        ALICE,
    )
    await ck.stream(
        "threads.add_user_message", {"thread_id": thread_id, "input": user_input("and now?")}
    )
    last = model.streamed_requests[-1]
    assert image_urls(last) == [f"data:image/png;base64,{b64(data)}"]
    assert notes(last) == []


# --- reading once, releasing at the end -------------------------------------------------------


async def test_each_file_is_read_once_per_reply_and_shared_by_its_model_calls(
    make_client: MakeClient, fake: tuple[FakeChatCompletions, str], store: PostgresStore
) -> None:
    ck = await client_for(make_client, fake)
    data = image()
    attachment_id = await upload(ck, data, "big.png")
    thread_id = await converse(ck, [[attachment_id], [attachment_id]])
    attachments: PgAttachmentStore = ck.app.state.attachment_store
    reads: list[str] = []
    iter_chunks = attachments.iter_chunks

    def counted(user_id: str, attachment_id: str) -> Any:
        reads.append(attachment_id)
        return iter_chunks(user_id, attachment_id)

    attachments.iter_chunks = counted  # type: ignore[method-assign]
    converter = AttachmentConverter(attachments).for_user("alice")
    history = (await store.load_thread_items(thread_id, None, 40, "asc", ALICE)).data
    planned = await converter.to_agent_input(history)
    files = converter.files
    assert files is not None and reads == []  # planning reads no bytes
    assert b64(data)[:1000] not in json.dumps(planned)  # the SDK keeps markers only
    first = input_images(await files.resolve(planned))
    second = input_images(await files.resolve(planned))  # a tool loop's next model call
    assert reads == [attachment_id]
    assert first == [f"data:image/png;base64,{b64(data)}"]
    assert second[0] is first[0]  # the same string, not a copy
    files.release()
    await files.resolve(planned)  # after the reply (never happens): read again, not kept
    assert reads == [attachment_id] * 2


async def test_a_file_deleted_after_planning_becomes_a_note(
    make_client: MakeClient, fake: tuple[FakeChatCompletions, str], store: PostgresStore
) -> None:
    ck = await client_for(make_client, fake)
    attachment_id = await upload(ck, image(), "big.png")
    thread_id = await converse(ck, [[attachment_id]])
    converter = AttachmentConverter(ck.app.state.attachment_store).for_user("alice")
    history = (await store.load_thread_items(thread_id, None, 40, "asc", ALICE)).data
    planned = await converter.to_agent_input(history)
    # the user deletes the thread (and with it the file) while the reply is being prepared
    await ck.call("threads.delete", {"thread_id": thread_id})
    r = await ck.http.get(f"/files/{attachment_id}", headers=ck.auth("alice"))
    assert r.status_code == 404
    assert converter.files is not None
    resolved: list[Any] = await converter.files.resolve(planned)
    parts = [p for m in resolved for p in m.get("content", []) if isinstance(p, dict)]
    assert not [p for p in parts if p.get("type") == "input_image"]
    assert any("no longer available" in str(p.get("text")) for p in parts)


@pytest.mark.parametrize(
    "size", [8, 9, 10, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 2]
)
async def test_streamed_base64_matches_the_file_at_every_chunk_boundary(
    make_client: MakeClient, size: int
) -> None:
    from app.chat.model_files import read_data_url

    ck = await make_client()
    data = image(size, seed=size)
    attachment_id = await upload(ck, data, "x.png")
    attachments: PgAttachmentStore = ck.app.state.attachment_store
    info = await attachments.file_info("alice", attachment_id)
    assert await read_data_url(attachments, "alice", info) == f"data:image/png;base64,{b64(data)}"


@pytest.mark.parametrize("provider", ["offline", "chat-completions"])
async def test_no_copy_of_a_file_outlives_its_reply(
    make_client: MakeClient, fake: tuple[FakeChatCompletions, str], provider: str
) -> None:
    """With the garbage collector off, so reference cycles keep whatever they hold: once the
    reply is over no large block allocated by the app is alive. Before, every turn's base64
    copies stayed in the Agents SDK's cycles until a full collection."""
    ck = await (make_client() if provider == "offline" else client_for(make_client, fake))
    size = 1024 * 1024
    attachment_id = await upload(ck, image(size), "big.png")
    big = size  # the base64 of the image is 4/3 of this: any copy of it is larger
    thread_id = await converse(ck, [[attachment_id]])
    gc.collect()
    gc.disable()
    tracemalloc.start(1)
    try:
        await ck.stream(
            "threads.add_user_message",
            {"thread_id": thread_id, "input": user_input("again", attachments=[attachment_id])},
        )
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/app/*")])
    finally:
        tracemalloc.stop()
        gc.enable()
    alive = [t for t in snapshot.traces if t.size >= big]
    assert alive == [], [(t.size, str(t.traceback)) for t in alive]
