"""Attachments through the whole service: ``create_app`` (JWT auth, /chatkit, /files), the agent
runner and the model. Bytes uploaded either way reach the model's input; the offline model
names them; links in stored threads work; another user gets 404 everywhere."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from agents.items import TResponseInputItem, TResponseStreamEvent
from sqlalchemy.ext.asyncio import AsyncEngine

from app.chat.offline_model import OfflineModel
from app.cli.prune import prune
from app.errors import AttachmentInUseError
from app.pg.store import PostgresStore
from tests.conftest import MakeClient

# Helpers, and the fixtures of its SDK server (for the stream-path test below).
from tests.files.test_attachments import (  # noqa: F401
    PDF,
    RecordingServer,
    attachments,
    chatkit,
    client,
    clock,
    counts,
    png,
    server,
    settings,
    sql,
    upload,
)
from tests.files.test_attachments import user_input as sdk_input
from tests.harness.chatkit_client import (
    ChatKitClient,
    assistant_text,
    done_items,
    of_type,
    parse_sse,
    user_input,
)

BASE = "http://testserver"


class RecordingModel(OfflineModel):
    """The offline model, keeping every input it was given."""

    def __init__(self) -> None:
        super().__init__(word_delay=0)
        self.inputs: list[list[TResponseInputItem]] = []

    async def stream_response(  # type: ignore[override]
        self, system_instructions: str | None, input: Any, *args: Any, **kwargs: Any
    ) -> AsyncIterator[TResponseStreamEvent]:
        self.inputs.append(list(input) if not isinstance(input, str) else [])
        async for event in super().stream_response(system_instructions, input, *args, **kwargs):
            yield event


def local(url: str) -> str:
    assert url.startswith(BASE + "/files/"), url
    return url[len(BASE) :]


async def _client(make_client: MakeClient, model: Any = None) -> ChatKitClient:
    return await make_client(model, public_base_url=BASE)


async def test_both_upload_strategies_reach_the_model_and_are_named(
    make_client: MakeClient, engine: AsyncEngine
) -> None:
    model = RecordingModel()
    ck = await _client(make_client, model)
    image = png(9, 9)
    notes = "meeting notes: budget approved ✓\n".encode()

    # direct: POST /files with the Bearer token
    r = await ck.http.post(
        "/files", files={"file": ("notes.txt", notes, "text/plain")}, headers=ck.auth("alice")
    )
    assert r.status_code == 200, r.text
    direct = r.json()
    assert (
        await ck.http.post("/files", files={"file": ("x.txt", b"x", "text/plain")})
    ).status_code == 401

    # two-phase: attachments.create over /chatkit, then the bytes to the signed URL, no token
    created = await ck.call(
        "attachments.create", {"name": "cat.png", "size": len(image), "mime_type": "image/png"}
    )
    descriptor = created["upload_descriptor"]
    assert descriptor["url"].startswith(BASE + "/files/") and descriptor["method"] == "POST"
    r = await ck.http.post(
        local(descriptor["url"]),
        files={"file": ("cat.png", image, "image/png")},
        headers=descriptor["headers"],
    )
    assert r.status_code == 200, r.text
    two_phase = r.json()
    assert two_phase["upload_descriptor"] is None

    # a message with both
    events = await ck.stream(
        "threads.create",
        {"input": user_input("what do you see?", attachments=[two_phase["id"], direct["id"]])},
    )
    [reply] = done_items(events, "assistant_message")
    text = assistant_text(reply)
    assert '"cat.png"' in text and '"notes.txt"' in text
    assert "what do you see" not in text and "(your message had 4 words)" in text

    # what the model was given
    [model_input] = model.inputs
    user_messages = [m for m in model_input if isinstance(m, dict) and m.get("role") == "user"]
    parts = user_messages[-1]["content"]
    assert isinstance(parts, list)
    assert parts[0] == {"type": "input_text", "text": "what do you see?"}
    images = [p for p in parts if p["type"] == "input_image"]
    assert len(images) == 1
    assert base64.b64decode(images[0]["image_url"].split(",", 1)[1]) == image
    texts = " ".join(p["text"] for p in parts if p["type"] == "input_text")
    assert "meeting notes: budget approved ✓" in texts

    # the stored thread hands out working preview links (no token)
    [user_item] = done_items(events, "user_message")
    thread_id = user_item["thread_id"]
    thread = await ck.call("threads.get_by_id", {"thread_id": thread_id})
    [stored] = [i for i in thread["items"]["data"] if i["type"] == "user_message"]
    [img] = [a for a in stored["attachments"] if a["type"] == "image"]
    preview = await ck.http.get(local(img["preview_url"]))
    assert preview.status_code == 200 and preview.content == image
    assert preview.headers["x-content-type-options"] == "nosniff"

    # a second turn: the history still carries the image, read again from PostgreSQL
    await ck.stream(
        "threads.add_user_message", {"thread_id": thread_id, "input": user_input("and now?")}
    )
    history = str(model.inputs[-1])
    assert base64.b64encode(image).decode() in history

    # deleting the thread deletes both files and their bytes
    assert await counts(engine) == (2, 2)
    await ck.call("threads.delete", {"thread_id": thread_id})
    assert await counts(engine) == (0, 0)
    gone = await ck.http.get(f"/files/{direct['id']}", headers=ck.auth("alice"))
    assert gone.status_code == 404


async def test_another_user_gets_404_through_the_service(
    make_client: MakeClient, engine: AsyncEngine
) -> None:
    ck = await _client(make_client)
    r = await ck.http.post(
        "/files", files={"file": ("paper.pdf", PDF, "application/pdf")}, headers=ck.auth("alice")
    )
    mine = r.json()
    missing = await ck.http.get("/files/atc_missing", headers=ck.auth("bob"))
    assert missing.status_code == 404

    r = await ck.http.get(f"/files/{mine['id']}", headers=ck.auth("bob"))
    assert r.status_code == 404 and r.json()["error"]["code"] == missing.json()["error"]["code"]
    r = await ck.http.delete(f"/files/{mine['id']}", headers=ck.auth("bob"))
    assert r.status_code == 404
    r = await ck.request(
        "threads.create", {"input": user_input("mine", attachments=[mine["id"]])}, user="bob"
    )
    assert r.status_code == 404, r.text
    r = await ck.request("attachments.delete", {"attachment_id": mine["id"]}, user="bob")
    assert r.status_code == 404, r.text

    d = await ck.http.get(f"/files/{mine['id']}", headers=ck.auth("alice"))
    assert d.status_code == 200 and d.content == PDF
    assert d.headers["content-disposition"].startswith('attachment; filename="paper.pdf"')
    assert await counts(engine) == (1, 1)


async def test_limits_through_the_service(make_client: MakeClient, engine: AsyncEngine) -> None:
    ck = await _client(make_client)
    big = ck.settings.max_upload_bytes + 1
    r = await ck.request(
        "attachments.create", {"name": "big.pdf", "size": big, "mime_type": "application/pdf"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = await ck.request(
        "attachments.create", {"name": "a.exe", "size": 10, "mime_type": "application/x-msdownload"}
    )
    assert r.status_code == 415
    r = await ck.http.post(
        "/files",
        files={"file": ("fake.png", b"not a png" * 10, "image/png")},
        headers=ck.auth("alice"),
    )
    assert r.status_code == 400 and "request_id" in r.json()["error"]
    assert await counts(engine) == (0, 0)
    # a file larger than the /chatkit body limit still uploads: /files streams
    size = ck.settings.max_body_bytes * 3
    r = await ck.http.post(
        "/files",
        files={"file": ("big.txt", b"a" * size, "text/plain")},
        headers=ck.auth("alice"),
    )
    assert r.status_code == 200, r.text


async def test_attachments_delete_over_chatkit(
    make_client: MakeClient, engine: AsyncEngine
) -> None:
    ck = await _client(make_client)
    r = await ck.http.post(
        "/files", files={"file": ("a.txt", b"hello", "text/plain")}, headers=ck.auth("alice")
    )
    await ck.call("attachments.delete", {"attachment_id": r.json()["id"]})
    assert await counts(engine) == (0, 0)


# --- one thread per attachment (issue 19, item 3) -------------------------------------------


async def _upload(ck: ChatKitClient, data: bytes, name: str, mime: str) -> str:
    r = await ck.http.post("/files", files={"file": (name, data, mime)}, headers=ck.auth("alice"))
    assert r.status_code == 200, r.text
    attachment_id: str = r.json()["id"]
    return attachment_id


async def _send(ck: ChatKitClient, thread_id: str | None, text: str, *ids: str) -> httpx.Response:
    message = user_input(text, attachments=list(ids))
    if thread_id is None:
        return await ck.request("threads.create", {"input": message})
    return await ck.request("threads.add_user_message", {"thread_id": thread_id, "input": message})


def _in_use(response: httpx.Response) -> bool:
    error = response.json().get("error", {}) if response.status_code == 409 else {}
    return error.get("code") == "attachment_in_use" and "Upload it again" in error["message"]


async def test_a_sent_file_is_never_deleted_with_another_thread(
    make_client: MakeClient, engine: AsyncEngine
) -> None:
    """The reproduction: a file sent in thread 1 and again in thread 2 went when thread 2 was
    deleted, though thread 1's message still showed it. A file now belongs to the thread
    that first sends it: another thread's use is refused before anything is stored."""
    ck = await _client(make_client)
    image = png(6, 5)
    file_id = await _upload(ck, image, "cat.png", "image/png")
    first = await _send(ck, None, "first", file_id)
    assert first.status_code == 200, first.text
    [thread1] = [e["thread"]["id"] for e in of_type(_events(first), "thread.created")]

    refused = await _send(ck, None, "the same file again", file_id)
    assert _in_use(refused), refused.text
    assert len((await ck.call("threads.list", {}))["data"]) == 1  # no empty thread made
    thread2, _ = await ck.create_thread("another subject")
    assert _in_use(await _send(ck, thread2, "here too", file_id))
    again = await _send(ck, thread1, "once more", file_id)  # its own thread: fine
    assert again.status_code == 200 and not of_type(_events(again), "error")

    await ck.call("threads.delete", {"thread_id": thread2})
    download = await ck.http.get(f"/files/{file_id}", headers=ck.auth("alice"))
    assert download.status_code == 200 and download.content == image
    shown = await ck.call("threads.get_by_id", {"thread_id": thread1})
    previews = [
        a["preview_url"]
        for i in shown["items"]["data"]
        if i["type"] == "user_message"
        for a in i["attachments"]
    ]
    assert len(previews) == 2
    for url in previews:
        assert (await ck.http.get(local(url))).content == image

    # the user cannot delete a file that messages show (ChatKit's attachments.delete is for
    # files taken out of the composer before sending); it goes with its thread
    in_use = await ck.request("attachments.delete", {"attachment_id": file_id})
    assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "attachment_in_use"
    in_use = await ck.http.delete(f"/files/{file_id}", headers=ck.auth("alice"))
    assert in_use.status_code == 409 and "deleted with its conversation" in in_use.text
    assert await counts(engine) == (1, 1)
    await ck.call("threads.delete", {"thread_id": thread1})
    gone = await ck.http.get(f"/files/{file_id}", headers=ck.auth("alice"))
    assert gone.status_code == 404 and await counts(engine) == (0, 0)


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    return parse_sse(response.text)


async def _age_thread(engine: AsyncEngine, thread_id: str, days: int) -> None:
    delta = timedelta(days=days)
    await sql(
        engine,
        "UPDATE chatkit_threads SET created_at = created_at - $2::interval, "
        "updated_at = updated_at - $2::interval WHERE id = $1",
        thread_id,
        delta,
    )
    await sql(
        engine,
        "UPDATE chatkit_items SET created_at = created_at - $2::interval WHERE thread_id = $1",
        thread_id,
        delta,
    )


async def test_prune_takes_a_sent_file_only_with_its_own_thread(
    make_client: MakeClient, engine: AsyncEngine
) -> None:
    ck = await _client(make_client)
    file_id = await _upload(ck, b"minutes of the meeting", "minutes.txt", "text/plain")
    first = await _send(ck, None, "keep this", file_id)
    [thread1] = [e["thread"]["id"] for e in of_type(_events(first), "thread.created")]
    thread2, _ = await ck.create_thread("another subject")
    attempt = await _send(ck, thread2, "and here", file_id)
    # the upload is old (past UPLOAD_ORPHAN_HOURS) and thread 2 has been idle for 100 days
    await sql(
        engine,
        "UPDATE chatkit_attachments SET created_at = created_at - interval '30 hours'",
    )
    await _age_thread(engine, thread2, 100)
    keep30 = ck.settings.model_copy(update={"retention_days": 30.0})

    report = await prune(engine, keep30)
    assert (report.threads, report.orphan_attachments, report.thread_attachments) == (1, 0, 0)
    download = await ck.http.get(f"/files/{file_id}", headers=ck.auth("alice"))
    assert download.status_code == 200 and download.content == b"minutes of the meeting"
    assert _in_use(attempt)  # (on the old code thread 2 took the file, and prune with it)

    await _age_thread(engine, thread1, 100)
    report = await prune(engine, keep30)
    assert (report.threads, report.thread_attachments) == (1, 1)
    assert await counts(engine) == (0, 0)


async def test_a_second_thread_is_refused_inside_the_stream_too(
    client: httpx.AsyncClient,  # noqa: F811
    server: RecordingServer,  # noqa: F811
    store: PostgresStore,
    engine: AsyncEngine,
) -> None:
    """The SDK's own server over our stores, without the endpoint's checks: what two sends
    racing past them meet. The store's save refuses the second thread atomically, the SDK
    ends that stream with the error (our endpoint turns it into an ``error`` event with the
    message) and the file stays with the first thread."""
    a = (await upload(client, b"only once", "a.txt", "text/plain")).json()
    create = {"type": "threads.create", "params": {"input": sdk_input("first", [a["id"]])}}
    await chatkit(server, create, {"user_id": "alice"})
    [thread1] = (await store.load_threads(10, None, "asc", {"user_id": "alice"})).data
    with pytest.raises(AttachmentInUseError):
        await chatkit(server, create, {"user_id": "alice"})
    rows = await sql(engine, "SELECT thread_id FROM chatkit_attachments WHERE id = $1", a["id"])
    assert [r[0] for r in rows] == [thread1.id]
    assert len(server.inputs) == 1  # the second message never reached the model
