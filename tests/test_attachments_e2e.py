"""Attachments through the whole service: ``create_app`` (JWT auth, /chatkit, /files), the agent
runner and the model. Bytes uploaded either way reach the model's input; the offline model
names them; links in stored threads work; another user gets 404 everywhere."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

from agents.items import TResponseInputItem, TResponseStreamEvent
from sqlalchemy.ext.asyncio import AsyncEngine

from app.offline_model import OfflineModel
from tests.chatkit_client import ChatKitClient, assistant_text, done_items, user_input
from tests.conftest import MakeClient
from tests.test_attachments import PDF, counts, png

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
