"""Attachments end to end: real HTTP (FastAPI over ASGI, and uvicorn on a socket), real PostgreSQL,
the real ChatKit SDK server for ``attachments.create`` / ``threads.create``.

The test app mounts ``app.files.routes.files_router`` with a header-based user (``X-User``): these tests
are about the file endpoints, not about authentication.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import uvicorn
from chatkit.server import ChatKitServer, StreamingResult
from chatkit.store import NotFoundError
from chatkit.types import (
    ImageAttachment,
    ThreadMetadata,
    UserMessageItem,
)
from fastapi import FastAPI, Header, HTTPException
from pydantic import AnyUrl
from sqlalchemy.ext.asyncio import AsyncEngine

from app.chat.converter import AttachmentConverter, attachment_names, attachments_note
from app.cli.prune import prune
from app.errors import PayloadTooLargeError, UnsupportedMediaTypeError
from app.files.content import content_disposition, sanitise_filename
from app.files.routes import files_router
from app.files.signing import UrlSigner, signing_secret
from app.files.store import CHUNK_SIZE, PgAttachmentStore
from app.pg.store import PostgresStore
from app.settings import PROJECT_ROOT, Settings
from tests.harness import factories as f

ALICE = {"user_id": "alice"}
BOB = {"user_id": "bob"}
MiB = 1024 * 1024
MAX = 2 * MiB
BASE = "http://testserver"


# --- helpers ------------------------------------------------------------------------------


def png(width: int = 3, height: int = 2, seed: int = 0) -> bytes:
    """A real PNG (RGB, no filter)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    rows = b"".join(
        b"\x00" + bytes((x * 40 + y * 7 + seed) % 256 for x in range(width * 3))
        for y in range(height)
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def header_user(x_user: Annotated[str | None, Header()] = None) -> str:
    if not x_user:
        raise HTTPException(401, "no user")
    return x_user


def make_app(attachments: PgAttachmentStore) -> FastAPI:
    app = FastAPI()
    app.include_router(files_router(header_user, attachments))
    return app


async def counts(engine: AsyncEngine) -> tuple[int, int]:
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        a = await raw.fetchval("SELECT count(*) FROM chatkit_attachments")
        b = await raw.fetchval("SELECT count(*) FROM chatkit_attachment_blobs")
    return int(a), int(b)


async def sql(engine: AsyncEngine, query: str, *args: Any) -> Any:
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        return await raw.fetch(query, *args)


def multipart_parts(
    data: bytes, name: str = "file.bin", mime: str = "application/octet-stream"
) -> tuple[bytes, bytes, str]:
    boundary = "----ckpgtestboundary7MA4YWxk"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: {mime}\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + data, tail, f"multipart/form-data; boundary={boundary}"


async def pieces(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


class RecordingServer(ChatKitServer[dict[str, str]]):
    """The SDK's server with our stores; ``respond`` records the model input it would send."""

    def __init__(
        self, store: PostgresStore, attachments: PgAttachmentStore, converter: AttachmentConverter
    ) -> None:
        super().__init__(store, attachments)
        self.converter = converter
        self.inputs: list[list[Any]] = []

    async def respond(  # type: ignore[override]
        self, thread: ThreadMetadata, input_user_message: Any, context: dict[str, str]
    ) -> AsyncIterator[Any]:
        page = await self.store.load_thread_items(thread.id, None, 100, "asc", context)
        converter = self.converter.for_user(context["user_id"])
        planned = await converter.to_agent_input(page.data)
        # what a model call is sent: the files' markers resolved (app.chat.model_files)
        assert converter.files is not None
        self.inputs.append(await converter.files.resolve(planned))
        return
        yield


async def chatkit(server: RecordingServer, body: dict[str, Any], ctx: dict[str, str]) -> Any:
    result = await server.process(json.dumps(body), ctx)
    if isinstance(result, StreamingResult):
        return [chunk async for chunk in result]
    return json.loads(result.json)


def user_input(text: str, attachment_ids: list[str]) -> dict[str, Any]:
    return {
        "content": [{"type": "input_text", "text": text}],
        "attachments": attachment_ids,
        "inference_options": {},
    }


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def settings(test_settings: Settings) -> Settings:
    return test_settings.model_copy(update={"public_base_url": BASE, "max_upload_bytes": MAX})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def attachments(store: PostgresStore, settings: Settings, clock: Clock) -> PgAttachmentStore:
    signer = UrlSigner(signing_secret(settings), BASE, settings.signed_url_ttl_seconds, clock)
    return PgAttachmentStore(store, settings, signer).install()


@pytest.fixture
async def client(attachments: PgAttachmentStore) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(attachments))
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        yield c


@pytest.fixture
def server(store: PostgresStore, attachments: PgAttachmentStore) -> RecordingServer:
    return RecordingServer(store, attachments, AttachmentConverter(attachments))


async def upload(
    client: httpx.AsyncClient, data: bytes, name: str, mime: str, user: str = "alice"
) -> httpx.Response:
    return await client.post("/files", files={"file": (name, data, mime)}, headers={"X-User": user})


async def create_two_phase(
    server: RecordingServer, name: str, size: int, mime: str, ctx: dict[str, str] = ALICE
) -> dict[str, Any]:
    out: dict[str, Any] = await chatkit(
        server,
        {"type": "attachments.create", "params": {"name": name, "size": size, "mime_type": mime}},
        ctx,
    )
    return out


def local(url: str) -> str:
    """The path and query of an absolute URL on this backend."""
    assert url.startswith(BASE + "/files/"), url
    return url[len(BASE) :]


# --- direct upload ------------------------------------------------------------------------


async def test_direct_upload_download_and_preview(
    client: httpx.AsyncClient, store: PostgresStore, engine: AsyncEngine
) -> None:
    data = png(40, 30)
    r = await upload(client, data, "cat.png", "image/png")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "image" and body["name"] == "cat.png"
    assert body["mime_type"] == "image/png" and body["upload_descriptor"] is None
    assert "metadata" not in body
    assert body["preview_url"].startswith(f"{BASE}/files/{body['id']}/preview?")

    # download needs the owner
    d = await client.get(f"/files/{body['id']}", headers={"X-User": "alice"})
    assert d.status_code == 200 and d.content == data
    assert d.headers["content-type"] == "image/png"
    assert d.headers["content-length"] == str(len(data))
    assert d.headers["x-content-type-options"] == "nosniff"
    assert d.headers["content-disposition"].startswith('attachment; filename="cat.png"')
    assert "sandbox" in d.headers["content-security-policy"]
    assert (await client.get(f"/files/{body['id']}")).status_code == 401

    # the preview URL works without any user header, inline
    p = await client.get(local(body["preview_url"]))
    assert p.status_code == 200 and p.content == data
    assert p.headers["content-disposition"].startswith("inline;")
    assert p.headers["x-content-type-options"] == "nosniff"

    # stored: metadata row ready, bytes in the blob table
    att = await store.load_attachment(body["id"], ALICE)
    assert isinstance(att, ImageAttachment) and att.upload_descriptor is None
    rows = await sql(
        engine,
        "SELECT status, size_bytes, mime_type, uploaded_at FROM chatkit_attachments WHERE id = $1",
        body["id"],
    )
    assert rows[0]["status"] == "ready" and rows[0]["size_bytes"] == len(data)
    assert rows[0]["mime_type"] == "image/png" and rows[0]["uploaded_at"] is not None
    assert await counts(engine) == (1, 1)


async def test_direct_upload_of_a_multi_chunk_file(
    client: httpx.AsyncClient, attachments: PgAttachmentStore, engine: AsyncEngine
) -> None:
    line = "ünïcode line, repeated to fill several chunks ✓\n".encode()
    data = line * (int(2.5 * CHUNK_SIZE) // len(line) + 1)
    r = await upload(client, data, "notes.txt", "text/plain")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "file" and body["mime_type"] == "text/plain"
    assert await counts(engine) == (1, math.ceil(len(data) / CHUNK_SIZE))
    d = await client.get(f"/files/{body['id']}", headers={"X-User": "alice"})
    assert d.content == data
    assert d.headers["content-type"] == "text/plain; charset=utf-8"
    info, head = await attachments.read_bytes("alice", body["id"], 100)
    assert info.size == len(data) and head == data[:100]


async def test_direct_upload_guesses_a_missing_type_and_sniffs(
    client: httpx.AsyncClient,
) -> None:
    r = await upload(client, PDF, "paper.pdf", "application/octet-stream")
    assert r.status_code == 200 and r.json()["mime_type"] == "application/pdf"
    r = await upload(client, png(), "no-extension", "application/octet-stream")
    assert r.status_code == 200 and r.json()["mime_type"] == "image/png"
    assert r.json()["type"] == "image"


async def test_direct_upload_needs_the_file_field(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/files", files={"other": ("a.txt", b"hi", "text/plain")}, headers={"X-User": "alice"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = await client.post(
        "/files", content=b"raw", headers={"X-User": "alice", "Content-Type": "text/plain"}
    )
    assert r.status_code == 400


# --- two-phase upload through the SDK -----------------------------------------------------


async def test_two_phase_upload_then_message_carries_the_image_to_the_model(
    client: httpx.AsyncClient,
    server: RecordingServer,
    store: PostgresStore,
    engine: AsyncEngine,
) -> None:
    data = png(16, 16, seed=3)
    created = await create_two_phase(server, "photo.png", len(data), "image/png")
    descriptor = created["upload_descriptor"]
    assert descriptor["method"] == "POST" and descriptor["url"].startswith(BASE + "/files/")
    assert created["type"] == "image"
    assert (await sql(engine, "SELECT status FROM chatkit_attachments"))[0][0] == "pending"
    # not served before the bytes are there
    assert (await client.get(local(created["preview_url"]))).status_code == 404

    # the ChatKit client POSTs multipart `file` to the descriptor URL, with no Bearer token
    r = await client.post(
        local(descriptor["url"]),
        files={"file": ("photo.png", data, "image/png")},
        headers=descriptor["headers"],
    )
    assert r.status_code == 200, r.text
    assert r.json()["upload_descriptor"] is None and r.json()["id"] == created["id"]
    assert (await store.load_attachment(created["id"], ALICE)).upload_descriptor is None
    assert (await client.get(local(r.json()["preview_url"]))).content == data

    # a second upload to the same URL is refused and changes nothing
    again = await client.post(
        local(descriptor["url"]), files={"file": ("x.png", png(2, 2), "image/png")}
    )
    assert again.status_code == 409
    assert (await client.get(local(r.json()["preview_url"]))).content == data

    # send a message with it: the SDK attaches it, and the model input carries the image
    await chatkit(
        server,
        {"type": "threads.create", "params": {"input": user_input("look", [created["id"]])}},
        ALICE,
    )
    rows = await sql(
        engine, "SELECT thread_id FROM chatkit_attachments WHERE id = $1", created["id"]
    )
    assert rows[0][0] is not None
    [model_input] = server.inputs
    content = model_input[0]["content"]
    assert content[0] == {"type": "input_text", "text": "look"}
    assert content[1] == {"type": "input_text", "text": '[The user attached: "photo.png"]'}
    assert content[2]["type"] == "input_image"
    prefix = "data:image/png;base64,"
    assert content[2]["image_url"].startswith(prefix)
    assert base64.b64decode(content[2]["image_url"][len(prefix) :]) == data
    assert attachment_names(model_input) == ["photo.png"]


async def test_two_phase_accepts_a_raw_body(
    client: httpx.AsyncClient, server: RecordingServer
) -> None:
    created = await create_two_phase(server, "doc.pdf", len(PDF), "application/pdf")
    url = local(created["upload_descriptor"]["url"])
    r = await client.put(url, content=PDF, headers={"Content-Type": "application/pdf"})
    assert r.status_code == 200, r.text
    d = await client.get(f"/files/{created['id']}", headers={"X-User": "alice"})
    assert d.content == PDF


async def test_two_phase_refuses_disallowed_or_oversized_declarations(
    server: RecordingServer, engine: AsyncEngine
) -> None:
    with pytest.raises(UnsupportedMediaTypeError):
        await create_two_phase(server, "x.exe", 10, "application/x-msdownload")
    with pytest.raises(PayloadTooLargeError):
        await create_two_phase(server, "big.png", MAX + 1, "image/png")
    assert await counts(engine) == (0, 0)


async def test_two_phase_bytes_must_match_the_declaration(
    client: httpx.AsyncClient, server: RecordingServer, engine: AsyncEngine
) -> None:
    data = png()
    cases = [
        ("image/png", len(data), b"GIF89a" + data[6:], 400),  # not a PNG
        ("image/png", len(data) - 1, data, 400),  # more than declared
        ("image/png", len(data) + 1, data, 400),  # less than declared
        ("text/plain", 4, b"\xff\xfe\x00a", 400),  # not UTF-8 text
    ]
    for mime, size, body, status in cases:
        created = await create_two_phase(server, "f", size, mime)
        r = await client.post(
            local(created["upload_descriptor"]["url"]), files={"file": ("f", body, mime)}
        )
        assert r.status_code == status, (mime, r.text)
        assert r.json()["error"]["code"] == "content_mismatch"
        # the failed attachment is gone, bytes and all
        assert await counts(engine) == (0, 0)
        with pytest.raises(NotFoundError):
            await server.store.load_attachment(created["id"], ALICE)


# --- signatures ---------------------------------------------------------------------------


async def test_forged_and_expired_signatures_are_refused(
    client: httpx.AsyncClient,
    server: RecordingServer,
    attachments: PgAttachmentStore,
    clock: Clock,
    settings: Settings,
    engine: AsyncEngine,
) -> None:
    data = png()
    created = await create_two_phase(server, "a.png", len(data), "image/png")
    upload_url = local(created["upload_descriptor"]["url"])
    parts = urlsplit(upload_url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    files = {"file": ("a.png", data, "image/png")}

    def with_query(path: str, **changes: str) -> str:
        return path + "?" + "&".join(f"{k}={v}" for k, v in {**q, **changes}.items())

    forged = [
        with_query(parts.path, s=q["s"][:-2] + ("AA" if q["s"][-2:] != "AA" else "BB")),
        with_query(parts.path, u="bob"),  # someone else's name on alice's signature
        with_query(parts.path, e=str(int(q["e"]) + 3600)),  # extended expiry
        parts.path,  # no signature at all
        # a preview signature does not open the upload
        with_query(
            parts.path,
            s=attachments.signer.signature("preview", "alice", created["id"], int(q["e"])),
        ),
    ]
    for url in forged:
        r = await client.post(url, files=files)
        assert r.status_code == 403, (url, r.text)
        assert r.json()["error"]["code"] == "invalid_signature"
    # nothing was consumed: the attachment is still pending and still uploadable
    assert (await sql(engine, "SELECT status FROM chatkit_attachments"))[0][0] == "pending"

    # an expired upload URL is refused too
    clock.now += settings.signed_url_ttl_seconds * 2
    assert (await client.post(upload_url, files=files)).status_code == 403
    fresh = await server.store.load_attachment(created["id"], ALICE)  # re-signed on load
    assert fresh.upload_descriptor is not None
    assert (
        await client.post(local(str(fresh.upload_descriptor.url)), files=files)
    ).status_code == 200

    # the preview URL: valid now, refused once expired, fresh again after a load
    assert isinstance(fresh, ImageAttachment)
    preview = local(str(fresh.preview_url))
    assert (await client.get(preview)).status_code == 200
    clock.now += settings.signed_url_ttl_seconds * 2
    expired = await client.get(preview)
    assert expired.status_code == 403 and "expired" in expired.json()["error"]["message"]
    reloaded = await server.store.load_attachment(created["id"], ALICE)
    assert isinstance(reloaded, ImageAttachment) and str(reloaded.preview_url) != str(
        fresh.preview_url
    )
    assert (await client.get(local(str(reloaded.preview_url)))).content == data
    # a signature made with another key is refused
    other = UrlSigner(b"another secret of enough length", BASE, 3600, clock)
    assert (
        await client.get(local(other.url("preview", "alice", created["id"])))
    ).status_code == 403


async def test_preview_urls_in_stored_messages_are_resigned_on_load(
    client: httpx.AsyncClient,
    server: RecordingServer,
    store: PostgresStore,
    clock: Clock,
    settings: Settings,
) -> None:
    data = png(5, 5)
    att = (await upload(client, data, "x.png", "image/png")).json()
    await chatkit(
        server,
        {"type": "threads.create", "params": {"input": user_input("hi", [att["id"]])}},
        ALICE,
    )
    [thread] = (await store.load_threads(10, None, "desc", ALICE)).data
    clock.now += settings.signed_url_ttl_seconds * 3  # every URL signed so far is dead
    assert (await client.get(local(att["preview_url"]))).status_code == 403

    # the SDK's own thread loading (threads.get_by_id) hands out live links
    loaded = await chatkit(
        server, {"type": "threads.get_by_id", "params": {"thread_id": thread.id}}, ALICE
    )
    [message] = [i for i in loaded["items"]["data"] if i["type"] == "user_message"]
    r = await client.get(local(message["attachments"][0]["preview_url"]))
    assert r.status_code == 200 and r.content == data
    # and so do load_item and load_attachment
    item = await store.load_item(thread.id, message["id"], ALICE)
    assert isinstance(item, UserMessageItem)
    assert (await client.get(local(str(item.attachments[0].preview_url)))).status_code == 200  # type: ignore[union-attr]


# --- authorization ------------------------------------------------------------------------


async def test_another_user_is_refused_in_every_operation(
    client: httpx.AsyncClient,
    server: RecordingServer,
    attachments: PgAttachmentStore,
    store: PostgresStore,
    engine: AsyncEngine,
) -> None:
    data = png(4, 4)
    mine = (await upload(client, data, "mine.png", "image/png")).json()
    missing = await client.get("/files/atc_doesnotexist", headers={"X-User": "bob"})
    assert missing.status_code == 404

    # download and delete over HTTP: exactly like a missing file
    r = await client.get(f"/files/{mine['id']}", headers={"X-User": "bob"})
    assert (r.status_code, r.json()) == (404, missing.json())
    r = await client.delete(f"/files/{mine['id']}", headers={"X-User": "bob"})
    assert (r.status_code, r.json()) == (404, missing.json())

    # preview: alice's signature does not open it for bob, bob's own signature finds nothing
    q = parse_qs(urlsplit(mine["preview_url"]).query)
    forged = f"/files/{mine['id']}/preview?u=bob&e={q['e'][0]}&s={q['s'][0]}"
    assert (await client.get(forged)).status_code == 403
    bobs = local(attachments.signer.url("preview", "bob", mine["id"]))
    r = await client.get(bobs)
    assert (r.status_code, r.json()) == (404, missing.json())

    # upload into alice's pending attachment with a URL signed for bob
    pending = await create_two_phase(server, "p.png", len(data), "image/png")
    bob_upload = local(attachments.signer.url("upload", "bob", pending["id"]))
    r = await client.post(bob_upload, files={"file": ("p.png", data, "image/png")})
    assert (r.status_code, r.json()) == (404, missing.json())
    assert (
        await sql(engine, "SELECT status FROM chatkit_attachments WHERE id = $1", pending["id"])
    )[0][0] == "pending"

    # attach alice's file to bob's message
    with pytest.raises(NotFoundError):
        await chatkit(
            server,
            {"type": "threads.create", "params": {"input": user_input("mine now", [mine["id"]])}},
            BOB,
        )
    rows = await sql(engine, "SELECT thread_id FROM chatkit_attachments WHERE id = $1", mine["id"])
    assert rows[0][0] is None
    assert server.inputs == []

    # delete through the SDK's own attachments.delete: the stores' deletes are idempotent (the
    # SDK's contract), so for bob it is a no-op on his own (empty) rows; alice's file stays.
    # Our /chatkit answers 404 first (tests/http/test_app_isolation.py).
    await chatkit(
        server, {"type": "attachments.delete", "params": {"attachment_id": mine["id"]}}, BOB
    )
    # read through the converter bound to bob
    part = await AttachmentConverter(attachments, "bob").attachment_to_message_content(
        await store.load_attachment(mine["id"], ALICE)
    )
    assert part["type"] == "input_text" and "no longer available" in part["text"]

    # alice's file is untouched throughout
    d = await client.get(f"/files/{mine['id']}", headers={"X-User": "alice"})
    assert d.status_code == 200 and d.content == data


async def test_owner_deletes_through_chatkit_and_http(
    client: httpx.AsyncClient, server: RecordingServer, engine: AsyncEngine
) -> None:
    a = (await upload(client, b"first", "a.txt", "text/plain")).json()
    b = (await upload(client, b"second", "b.txt", "text/plain")).json()
    assert await counts(engine) == (2, 2)
    await chatkit(
        server, {"type": "attachments.delete", "params": {"attachment_id": a["id"]}}, ALICE
    )
    assert await counts(engine) == (1, 1)
    r = await client.delete(f"/files/{b['id']}", headers={"X-User": "alice"})
    assert r.status_code == 204
    assert await counts(engine) == (0, 0)
    assert (await client.get(f"/files/{b['id']}", headers={"X-User": "alice"})).status_code == 404
    # Deleting again: the SDK's server over our stores succeeds (reference-store behaviour),
    # while the HTTP route still says 404 (it checks before deleting).
    again = await chatkit(
        server, {"type": "attachments.delete", "params": {"attachment_id": a["id"]}}, ALICE
    )
    assert again == {}
    r = await client.delete(f"/files/{b['id']}", headers={"X-User": "alice"})
    assert r.status_code == 404


# --- limits and types ---------------------------------------------------------------------


async def test_oversize_uploads_are_refused_with_nothing_stored(
    client: httpx.AsyncClient, server: RecordingServer, engine: AsyncEngine
) -> None:
    big = b"a" * (MAX + 1)
    # announced by Content-Length: refused before reading
    r = await upload(client, big, "big.txt", "text/plain")
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    # streamed without a length (chunked): refused once the limit is crossed
    head, tail, ctype = multipart_parts(big, "big.txt", "text/plain")

    async def body() -> AsyncIterator[bytes]:
        async for p in pieces(head + tail):
            yield p

    r = await client.post(
        "/files", content=body(), headers={"X-User": "alice", "Content-Type": ctype}
    )
    assert r.status_code == 413
    # two-phase: declared small, sends too much
    created = await create_two_phase(server, "s.txt", 10, "text/plain")
    r = await client.post(
        local(created["upload_descriptor"]["url"]),
        content=body(),
        headers={"Content-Type": ctype},
    )
    assert r.status_code in (400, 413)
    assert await counts(engine) == (0, 0)
    # exactly the limit is fine
    r = await upload(client, b"a" * MAX, "max.txt", "text/plain")
    assert r.status_code == 200 and r.json()["mime_type"] == "text/plain"


@pytest.mark.parametrize(
    ("name", "mime", "data", "status"),
    [
        ("evil.exe", "application/x-msdownload", b"MZ\x90\x00" * 10, 415),
        ("page.html", "text/html", b"<script>alert(1)</script>", 415),
        ("cat.png", "image/png", b"<svg onload=alert(1)>" + b" " * 40, 400),  # not a PNG
        ("cat.jpg", "image/jpeg", png(), 400),  # a PNG is not a JPEG
        ("doc.pdf", "application/pdf", b"hello, not a pdf at all...........", 400),
        ("t.txt", "text/plain", b"binary \x00 inside", 400),
        ("t.txt", "text/plain", b"latin-1 \xe9t\xe9", 400),
        ("t.txt", "text/plain", b"x" * (CHUNK_SIZE * 2) + b"\xff", 400),  # late
        ("f.bmp", "image/x-unknown", b"\x00" * 64, 415),
    ],
)
async def test_disallowed_or_mismatching_types_are_refused_with_nothing_stored(
    client: httpx.AsyncClient, engine: AsyncEngine, name: str, mime: str, data: bytes, status: int
) -> None:
    r = await upload(client, data, name, mime)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and r.json()["error"]["message"]
    assert await counts(engine) == (0, 0)


async def test_allowed_types_setting_is_honoured(
    store: PostgresStore, settings: Settings, engine: AsyncEngine
) -> None:
    narrow = settings.model_copy(update={"allowed_mime_types": ["text/*"]})
    app = make_app(PgAttachmentStore(store, narrow))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        assert (await upload(c, png(), "a.png", "image/png")).status_code == 415
        assert (await upload(c, b"# hi", "a.md", "text/markdown")).status_code == 200


# --- interrupted uploads ------------------------------------------------------------------


class ClientGone(Exception):
    pass


async def test_interrupted_uploads_leave_no_attachment(
    client: httpx.AsyncClient, server: RecordingServer, engine: AsyncEngine
) -> None:
    data = b"y" * (CHUNK_SIZE * 3)
    head, _tail, ctype = multipart_parts(data, "half.txt", "text/plain")

    def aborting() -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            async for p in pieces(head[: len(head) // 2 + CHUNK_SIZE]):
                yield p
            raise ClientGone

        return gen()

    with pytest.raises(ClientGone):
        await client.post(
            "/files", content=aborting(), headers={"X-User": "alice", "Content-Type": ctype}
        )
    assert await counts(engine) == (0, 0)

    created = await create_two_phase(server, "half.txt", len(data), "text/plain")
    with pytest.raises(ClientGone):
        await client.post(
            local(created["upload_descriptor"]["url"]),
            content=aborting(),
            headers={"Content-Type": ctype},
        )
    assert await counts(engine) == (0, 0)

    # a body that simply ends before the closing boundary is refused the same way
    r = await client.post(
        "/files", content=head, headers={"X-User": "alice", "Content-Type": ctype}
    )
    assert r.status_code == 400
    assert await counts(engine) == (0, 0)


async def test_client_disconnect_over_a_real_socket_leaves_no_attachment(
    attachments: PgAttachmentStore, engine: AsyncEngine
) -> None:
    """uvicorn on loopback; the client sends half a body and closes the socket."""
    config = uvicorn.Config(
        make_app(attachments), host="127.0.0.1", port=0, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        data = b"z" * (CHUNK_SIZE * 4)
        head, tail, ctype = multipart_parts(data, "cut.txt", "text/plain")
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            (
                f"POST /files HTTP/1.1\r\nHost: 127.0.0.1\r\nX-User: alice\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(head) + len(tail)}\r\n\r\n"
            ).encode()
            + head[: CHUNK_SIZE * 2 + 1000]
        )
        await writer.drain()
        # the upload is under way: chunks are arriving in the database
        for _ in range(500):
            if (await counts(engine))[1] >= 1:
                break
            await asyncio.sleep(0.01)
        assert (await counts(engine))[1] >= 1
        writer.close()
        for _ in range(500):
            if await counts(engine) == (0, 0):
                break
            await asyncio.sleep(0.01)
        assert await counts(engine) == (0, 0)
    finally:
        server.should_exit = True
        await task


async def test_upload_memory_does_not_grow_with_file_size(
    store: PostgresStore, settings: Settings, engine: AsyncEngine
) -> None:
    """Traced allocations while an 8 MiB body streams in stay near one chunk's worth."""
    roomy = PgAttachmentStore(store, settings.model_copy(update={"max_upload_bytes": 16 * MiB}))
    head, tail, ctype = multipart_parts(b"m" * (8 * MiB), "big.txt", "text/plain")
    whole = head + tail
    del head

    async def body() -> AsyncIterator[bytes]:
        async for p in pieces(whole):
            yield p

    transport = httpx.ASGITransport(app=make_app(roomy))
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            r = await c.post(
                "/files", content=body(), headers={"X-User": "alice", "Content-Type": ctype}
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert r.status_code == 200, r.text
    assert await counts(engine) == (1, 8 * MiB // CHUNK_SIZE)
    assert peak - base < 2 * MiB, peak - base


# --- lifecycle ----------------------------------------------------------------------------


async def test_thread_delete_removes_its_files(
    client: httpx.AsyncClient, server: RecordingServer, store: PostgresStore, engine: AsyncEngine
) -> None:
    kept = (await upload(client, b"not attached", "k.txt", "text/plain")).json()
    a = (await upload(client, b"x" * (CHUNK_SIZE + 5), "a.txt", "text/plain")).json()
    b = (await upload(client, png(), "b.png", "image/png")).json()
    await chatkit(
        server,
        {
            "type": "threads.create",
            "params": {"input": user_input("two files", [a["id"], b["id"]])},
        },
        ALICE,
    )
    [thread] = (await store.load_threads(10, None, "desc", ALICE)).data
    assert await counts(engine) == (3, 4)
    await store.delete_thread(thread.id, ALICE)
    assert await counts(engine) == (1, 1)
    assert (await client.get(f"/files/{a['id']}", headers={"X-User": "alice"})).status_code == 404
    assert (
        await client.get(f"/files/{kept['id']}", headers={"X-User": "alice"})
    ).status_code == 200


async def _age(engine: AsyncEngine, table: str, ids: list[str], delta: timedelta) -> None:
    column = (
        "updated_at = updated_at - $2::interval, created_at = created_at - $2::interval"
        if table == "chatkit_threads"
        else "created_at = created_at - $2::interval"
    )
    await sql(engine, f"UPDATE {table} SET {column} WHERE id = ANY($1::text[])", ids, delta)


async def test_prune_removes_orphans_and_old_threads_and_keeps_the_rest(
    client: httpx.AsyncClient,
    server: RecordingServer,
    store: PostgresStore,
    settings: Settings,
    engine: AsyncEngine,
) -> None:
    # uploads: an old orphan, a fresh orphan, an old one attached to a live thread
    old_orphan = (await upload(client, b"o" * 1000, "old.txt", "text/plain")).json()
    fresh_orphan = (await upload(client, b"fresh", "fresh.txt", "text/plain")).json()
    attached = (await upload(client, b"keep me", "att.txt", "text/plain")).json()
    await chatkit(
        server,
        {"type": "threads.create", "params": {"input": user_input("live", [attached["id"]])}},
        ALICE,
    )
    [live] = (await store.load_threads(10, None, "desc", ALICE)).data
    await _age(
        engine, "chatkit_attachments", [old_orphan["id"], attached["id"]], timedelta(hours=30)
    )

    # threads: one idle for 100 days (with an item, feedback and a file), one old but still
    # active (a recent item), one of bob's that is idle too
    old = f.thread(created_at=datetime.now(UTC) - timedelta(days=100))
    await store.save_thread(old, ALICE)
    msg = f.user_message(old.id, created_at=datetime.now(UTC) - timedelta(days=99))
    await store.add_thread_item(old.id, msg, ALICE)
    await store.save_feedback(old.id, [msg.id], "positive", ALICE)
    old_file = (await upload(client, b"q" * 300, "oldfile.txt", "text/plain")).json()
    await sql(
        engine,
        "UPDATE chatkit_attachments SET thread_id = $1 WHERE id = $2",
        old.id,
        old_file["id"],
    )
    active = f.thread(created_at=datetime.now(UTC) - timedelta(days=100))
    await store.save_thread(active, ALICE)
    await store.add_thread_item(active.id, f.user_message(active.id), ALICE)
    bobs = f.thread(created_at=datetime.now(UTC) - timedelta(days=50))
    await store.save_thread(bobs, BOB)
    await _age(engine, "chatkit_threads", [old.id, active.id], timedelta(days=100))
    await _age(engine, "chatkit_threads", [bobs.id], timedelta(days=50))

    # without RETENTION_DAYS only the old orphan goes; a dry run only counts
    report = await prune(engine, settings, dry_run=True)
    assert (report.orphan_attachments, report.orphan_bytes, report.threads) == (1, 1000, 0)
    assert await counts(engine) == (4, 4)
    report = await prune(engine, settings)
    assert (report.orphan_attachments, report.orphan_bytes, report.threads) == (1, 1000, 0)
    assert "retention is off" in report.summary()
    assert await counts(engine) == (3, 3)

    keep30 = settings.model_copy(update={"retention_days": 30.0})
    dry = await prune(engine, keep30, dry_run=True)
    assert (dry.threads, dry.items, dry.feedback, dry.thread_attachments) == (2, 1, 1, 1)
    assert dry.thread_attachment_bytes == 300 and dry.orphan_attachments == 0
    assert len(await sql(engine, "SELECT id FROM chatkit_threads")) == 4

    done = await prune(engine, keep30, batch=1)  # batches of one: the loop is exercised
    assert (done.threads, done.items, done.feedback, done.thread_attachments) == (2, 1, 1, 1)
    remaining = {r[0] for r in await sql(engine, "SELECT id FROM chatkit_threads")}
    assert remaining == {live.id, active.id}
    left = {r[0] for r in await sql(engine, "SELECT id FROM chatkit_attachments")}
    assert left == {fresh_orphan["id"], attached["id"]}
    assert await counts(engine) == (2, 2)
    assert (await prune(engine, keep30)).threads == 0  # idempotent


async def test_prune_command_line(
    client: httpx.AsyncClient, engine: AsyncEngine, database_url: str, tmp_path: Any
) -> None:
    orphan = (await upload(client, b"bye", "bye.txt", "text/plain")).json()
    await _age(engine, "chatkit_attachments", [orphan["id"]], timedelta(hours=48))
    env = {**os.environ, "DATABASE_URL": database_url, "DATA_DIR": str(tmp_path)}
    env.pop("RETENTION_DAYS", None)

    def run(*args: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "app.cli.prune", "--json", *args],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result

    dry = await asyncio.to_thread(run, "--dry-run")
    assert dry["dry_run"] is True and dry["orphan_attachments"] == 1
    assert await counts(engine) == (1, 1)
    real = await asyncio.to_thread(run)
    assert real["orphan_attachments"] == 1 and real["orphan_bytes"] == 3
    assert await counts(engine) == (0, 0)


# --- model input --------------------------------------------------------------------------


async def test_converter_output_for_each_kind(
    client: httpx.AsyncClient, store: PostgresStore, settings: Settings
) -> None:
    wide = settings.model_copy(
        update={"allowed_mime_types": [*settings.allowed_mime_types, "application/zip"]}
    )
    atts = PgAttachmentStore(store, wide)
    app = make_app(atts)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        img = (await upload(c, png(7, 7), "pic.png", "image/png")).json()
        txt = (await upload(c, ("line ✓\n" * 4000).encode(), "log.txt", "text/plain")).json()
        pdf = (await upload(c, PDF, "paper.pdf", "application/pdf")).json()
        zip_ = (await upload(c, b"PK\x05\x06" + b"\x00" * 18, "a.zip", "application/zip")).json()
    conv = AttachmentConverter(atts, text_max_bytes=1000).for_user("alice")

    async def convert(att: dict[str, Any]) -> Any:
        return await conv.attachment_to_message_content(
            await store.load_attachment(att["id"], ALICE)
        )

    part = await convert(img)
    assert part["type"] == "input_image" and part["detail"] == "auto"
    assert base64.b64decode(part["image_url"].split(",", 1)[1]) == png(7, 7)

    part = await convert(txt)
    assert part["type"] == "input_text"
    assert '"log.txt"' in part["text"] and "line ✓" in part["text"]
    assert "Truncated: the first" in part["text"] and len(part["text"].encode()) < 1500

    part = await convert(pdf)
    assert part["type"] == "input_file" and part["filename"] == "paper.pdf"
    assert base64.b64decode(part["file_data"].split(",", 1)[1]) == PDF
    no_files = AttachmentConverter(atts, "alice", pdf_as_file=False)
    described = await no_files.attachment_to_message_content(
        await store.load_attachment(pdf["id"], ALICE)
    )
    assert described["type"] == "input_text" and '"paper.pdf"' in described["text"]

    part = await convert(zip_)
    assert part["type"] == "input_text" and '"a.zip"' in part["text"]
    assert "application/zip" in part["text"] and "cannot be shown" in part["text"]

    short = (await store.load_attachment(txt["id"], ALICE)).model_copy()
    await store.delete_attachment(txt["id"], ALICE)
    part = await conv.attachment_to_message_content(short)
    assert part["type"] == "input_text" and "no longer available" in part["text"]


async def test_converter_needs_a_user(attachments: PgAttachmentStore) -> None:
    from app.errors import MissingUserError

    with pytest.raises(MissingUserError):
        await AttachmentConverter(attachments).attachment_to_message_content(f.file_attachment())


# --- units --------------------------------------------------------------------------------


def test_filenames_are_sanitised() -> None:
    assert sanitise_filename("../../etc/passwd") == "passwd"
    assert sanitise_filename("C:\\Users\\x\\report.pdf") == "report.pdf"
    assert sanitise_filename("a\r\nb\x00c.txt") == "a_b_c.txt"
    assert sanitise_filename("") == "file" and sanitise_filename("...") == "file"
    long = "n" * 300 + ".txt"
    assert len(sanitise_filename(long)) == 255 and sanitise_filename(long).endswith(".txt")
    header = content_disposition('évil"; filename="x.html\r\n.txt', inline=False)
    assert "\r" not in header and "\n" not in header
    assert header.startswith('attachment; filename="_vil__ filename=_x.html_.txt"')
    assert "filename*=UTF-8''%C3%A9vil%22%3B%20filename%3D%22x.html_.txt" in header


def test_signing_secret_is_kept_in_data_dir(tmp_path: Any) -> None:
    s = Settings(data_dir=tmp_path)
    first = signing_secret(s)
    assert len(first) >= 32 and signing_secret(s) == first
    assert (tmp_path / "attachment-signing.key").stat().st_mode & 0o077 == 0
    assert (
        signing_secret(Settings(data_dir=tmp_path, attachment_signing_secret="x" * 32)) == b"x" * 32
    )


def test_signed_urls_are_stable_within_a_step_and_expire() -> None:
    clock = Clock()
    clock.now = 1_800_000_000 + 5  # a multiple of the 60 s step, plus a little
    signer = UrlSigner(b"k" * 32, "https://chat.example.com", 600, clock)
    url = signer.url("preview", "alice", "atc_1")
    assert url.startswith("https://chat.example.com/files/atc_1/preview?u=alice&e=1800000660&s=")
    clock.now += 50  # same step: the same URL, so the browser cache keeps working
    assert signer.url("preview", "alice", "atc_1") == url
    clock.now += 10  # next step: a new URL
    assert signer.url("preview", "alice", "atc_1") != url
    assert signer.url("preview", "bob", "atc_1") != signer.url("preview", "alice", "atc_1")
    q = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert signer.verify("preview", "alice", "atc_1", q["e"], q["s"]) == int(q["e"])
    clock.now += 700
    with pytest.raises(Exception, match="expired"):
        signer.verify("preview", "alice", "atc_1", q["e"], q["s"])


async def test_only_our_own_links_are_resigned(
    attachments: PgAttachmentStore, store: PostgresStore, settings: Settings
) -> None:
    foreign = f.image_attachment()  # preview_url on some other host: left alone
    await store.save_attachment(foreign, ALICE)
    assert await store.load_attachment(foreign.id, ALICE) == foreign
    # a link of ours made under an older PUBLIC_BASE_URL comes back on the current one
    moved = foreign.model_copy(
        update={
            "id": "atc_moved",
            "preview_url": AnyUrl("https://old.example/files/atc_moved/preview?u=alice&e=1&s=x"),
        }
    )
    await store.save_attachment(moved, ALICE)
    loaded = await store.load_attachment("atc_moved", ALICE)
    assert isinstance(loaded, ImageAttachment)
    assert str(loaded.preview_url).startswith(f"{BASE}/files/atc_moved/preview?u=alice&e=")


async def test_errors_can_go_to_the_apps_own_handlers(attachments: PgAttachmentStore) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse

    from app.errors import AppError

    app = FastAPI()
    app.include_router(files_router(header_user, attachments, handle_errors=False))

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": {"code": "not_found", "by": "app"}}, status_code=404)

    async def app_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AppError)
        return JSONResponse({"error": {"code": exc.code, "by": "app"}}, status_code=exc.status_code)

    app.add_exception_handler(NotFoundError, not_found)
    app.add_exception_handler(AppError, app_error)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        r = await c.get("/files/atc_nope", headers={"X-User": "alice"})
        assert r.status_code == 404 and r.json()["error"]["by"] == "app"
        r = await c.get("/files/atc_nope/preview?u=alice&e=1&s=bad")
        assert r.status_code == 403 and r.json()["error"] == {
            "code": "invalid_signature",
            "by": "app",
        }


def test_attachment_names_come_from_the_latest_turn_only() -> None:
    note = attachments_note([f.file_attachment(), f.image_attachment()])
    assert note == '[The user attached: "report.pdf", "cat.png"]'
    turn = {
        "role": "user",
        "content": [{"type": "input_text", "text": "hi"}, {"type": "input_text", "text": note}],
    }
    quoted = {
        "role": "user",
        "content": [{"type": "input_text", "text": "The user is referring to"}],
    }
    reply = {"role": "assistant", "content": "ok", "type": "message"}
    plain = {"role": "user", "content": [{"type": "input_text", "text": "again"}]}
    assert attachment_names([turn, quoted]) == ["report.pdf", "cat.png"]
    assert attachment_names([turn, reply, plain]) == []
    assert attachment_names("text") == [] and attachment_names([]) == []
    odd = attachments_note([f.file_attachment().model_copy(update={"name": 'a "quoted", name]'})])
    assert attachment_names(
        [{"role": "user", "content": [{"type": "input_text", "text": odd}]}]
    ) == ['a "quoted", name]']
