"""The design most tutorials show, the server benchmark's other baseline (issue 14).

The SDK's own ``chatkit.server.ChatKitServer``, unmodified (its ``process()`` parses, routes
and serialises), over an in-memory dict store (``bench.memory_store.MemoryStore``), behind a
FastAPI ``POST /chatkit`` route that checks the bearer JWT with PyJWT and returns the
``NonStreamingResult``'s JSON. chatkit-pg has to beat this by a wide margin to be worth a
database: the figure quoted is chatkit-pg's throughput over this one's.

At startup it copies the benchmark user's threads and items from the database the app's side
was seeded into (``BENCH_DSN``), in the store's keyset order, through the store's own methods:
the same data, so the same pages and the same bodies.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import jwt
from chatkit.server import ChatKitServer, StreamingResult
from chatkit.types import ThreadItem, ThreadMetadata, ThreadStreamEvent, UserMessageItem
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import TypeAdapter

from bench.memory_store import MemoryStore

Context = dict[str, Any]


class TutorialServer(ChatKitServer[Context]):
    async def respond(
        self, thread: ThreadMetadata, input_user_message: UserMessageItem | None, context: Context
    ) -> AsyncIterator[ThreadStreamEvent]:
        """A tutorial runs its agent here; the list requests measured never get here."""
        return
        yield


async def copy_user_data(dsn: str, user: str, store: MemoryStore) -> tuple[int, int]:
    """The user's threads and items from our tables into ``store``; returns their counts."""
    conn = await asyncpg.connect(dsn)
    try:
        threads = await conn.fetch(
            "SELECT data::text FROM chatkit_threads WHERE user_id = $1 ORDER BY created_at, seq",
            user,
        )
        items = await conn.fetch(
            "SELECT thread_id, data::text FROM chatkit_items WHERE user_id = $1 "
            "ORDER BY created_at, seq",
            user,
        )
    finally:
        await conn.close()
    context: Context = {"user_id": user}
    for row in threads:
        await store.save_thread(ThreadMetadata.model_validate_json(row[0]), context)
    adapter: TypeAdapter[ThreadItem] = TypeAdapter(ThreadItem)
    for row in items:
        await store.add_thread_item(row[0], adapter.validate_json(row[1]), context)
    return len(threads), len(items)


def create_tutorial_app() -> FastAPI:
    secret = os.environ["BENCH_JWT_SECRET"]
    algorithms = [os.environ.get("BENCH_JWT_ALGORITHM", "HS256")]
    store = MemoryStore()
    server = TutorialServer(store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await copy_user_data(os.environ["BENCH_DSN"], os.environ["BENCH_USER"], store)
        yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/chatkit")
    async def chatkit_endpoint(request: Request) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            raise HTTPException(status_code=401)
        try:
            claims = jwt.decode(token.strip(), secret, algorithms=algorithms)
        except jwt.PyJWTError:
            raise HTTPException(status_code=401) from None
        result = await server.process(await request.body(), {"user_id": claims["sub"]})
        if isinstance(result, StreamingResult):
            return StreamingResponse(result, media_type="text/event-stream")
        return Response(content=result.json, media_type="application/json")

    return app
