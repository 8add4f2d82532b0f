"""Attachments end to end: real HTTP (FastAPI over ASGI, and uvicorn on a socket), real PostgreSQL,
the real ChatKit SDK server for ``attachments.create`` / ``threads.create``.

The test app mounts ``app.files.routes.files_router`` with a header-based user (``X-User``) and the
app's exception handlers (its one error mapping): these tests are about the file endpoints, not
about authentication.
"""

from __future__ import annotations

import base64
import math
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from chatkit.store import NotFoundError
from chatkit.types import (
    ImageAttachment,
    UserMessageItem,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from app.chat.converter import AttachmentConverter
from app.chat.item_converter import attachment_names
from app.errors import PayloadTooLargeError, UnsupportedMediaTypeError
from app.files.signing import UrlSigner
from app.files.store import CHUNK_SIZE, PgAttachmentStore
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness.factories import png
from tests.harness.files import (
    BASE,
    MAX,
    PDF,
    Clock,
    RecordingServer,
    chatkit,
    counts,
    create_two_phase,
    local,
    make_app,
    multipart_parts,
    pieces,
    sql,
    upload,
    user_input,
)

ALICE = {"user_id": "alice"}
BOB = {"user_id": "bob"}

# The contract as the tables' owner, through the app's role (custom and generic plans) and
# through the role on a Citus cluster, the bytes in chatkit_attachment_blobs.
pytestmark = pytest.mark.backends("owner", "role-custom", "role-generic", "citus-role")
# Their set-up ages rows with an UPDATE Citus refuses (a STABLE timestamptz - interval on a
# column); tests/citus/test_citus_rls.py runs prune on the cluster.
ONE_NODE = pytest.mark.backends("owner", "role-custom", "role-generic")


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
    app = make_app(PgAttachmentStore(store.pool, store, narrow))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        assert (await upload(c, png(), "a.png", "image/png")).status_code == 415
        assert (await upload(c, b"# hi", "a.md", "text/markdown")).status_code == 200
