"""What the attachment tests share (tests/files/): a FastAPI app with the /files routes for a
header-named user, an SDK server that records what the model was sent, upload helpers and row
counts."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
from chatkit.server import ChatKitServer, StreamingResult
from chatkit.types import (
    ThreadMetadata,
)
from fastapi import FastAPI, Header, HTTPException
from sqlalchemy.ext.asyncio import AsyncEngine

from app.chat.converter import AttachmentConverter
from app.files.routes import files_router
from app.files.store import PgAttachmentStore
from app.main import install_error_handlers
from app.pg.store import PostgresStore

ALICE = {"user_id": "alice"}
MiB = 1024 * 1024
MAX = 2 * MiB
BASE = "http://testserver"


# --- helpers ------------------------------------------------------------------------------


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
    """The file routes with the app's one error mapping (app.main), as the service mounts them."""
    app = FastAPI()
    install_error_handlers(app)
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
