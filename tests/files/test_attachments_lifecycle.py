"""Attachments' lifecycle: interrupted uploads leave nothing, thread deletion and prune remove
files and keep the rest, what the model is sent for each kind, and the small pure helpers.

The same test app and backends as test_attachments.py (tests/harness/files.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import uvicorn
from chatkit.types import (
    ImageAttachment,
)
from pydantic import AnyUrl
from sqlalchemy.ext.asyncio import AsyncEngine

from app.chat.converter import AttachmentConverter
from app.chat.item_converter import attachment_names, attachments_note
from app.cli.prune import prune
from app.files.content import content_disposition, sanitise_filename
from app.files.signing import UrlSigner, url_signing_secret
from app.files.store import CHUNK_SIZE, PgAttachmentStore
from app.pg.store import PostgresStore
from app.settings import PROJECT_ROOT, Settings
from tests.harness import factories as f
from tests.harness.factories import png
from tests.harness.files import (
    BASE,
    PDF,
    Clock,
    MiB,
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
    roomy = PgAttachmentStore(
        store.pool, store, settings.model_copy(update={"max_upload_bytes": 16 * MiB})
    )
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


@ONE_NODE
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


@ONE_NODE
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
    atts = PgAttachmentStore(store.pool, store, wide)
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
    first = url_signing_secret(s)
    assert len(first) >= 32 and url_signing_secret(s) == first
    assert (tmp_path / "attachment-signing.key").stat().st_mode & 0o077 == 0
    assert (
        url_signing_secret(Settings(data_dir=tmp_path, attachment_signing_secret="x" * 32))
        == b"x" * 32
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
