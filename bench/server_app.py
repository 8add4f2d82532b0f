"""The app the server benchmark runs in its own uvicorn process (uvloop, httptools, 1 worker).

``create_bench_app()`` is the real ``app.main.create_app`` with two additions:

* a scripted model that streams exactly N one-word text deltas when the last user message is
  ``deltas:N`` (no sleeps: the cost measured is the server's);
* ``PUT/POST /bench/bare/{name}``: a bare FastAPI endpoint answering stored bytes, the baseline
  for ``threads.list`` / ``items.list`` (same process, same middleware, same JSON size).

``BENCH_STORE=memory`` swaps the Postgres store for ``bench.memory_store.MemoryStore``.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from typing import Any

from agents import Model, ModelResponse
from agents.items import TResponseInputItem, TResponseStreamEvent
from fastapi import FastAPI, Request
from fastapi.responses import Response

from app.chat.offline_model import _last_user_text, text_response_events
from app.ids import new_id
from app.main import create_app
from app.settings import get_settings
from bench.memory_store import MemoryStore

_DELTAS = re.compile(r"deltas:(\d+)")


def _count(input: str | list[TResponseInputItem]) -> int:
    match = _DELTAS.search(_last_user_text(input))
    return int(match.group(1)) if match else 10


class DeltaModel(Model):
    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        raise NotImplementedError("the benchmark only streams")

    async def stream_response(  # type: ignore[override]
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        *args: Any,
        **kwargs: Any,
    ) -> AsyncIterator[TResponseStreamEvent]:
        for event in text_response_events(["word "] * _count(input), item_id=new_id("message")):
            yield event


def create_bench_app() -> FastAPI:
    settings = get_settings()
    store = MemoryStore() if os.environ.get("BENCH_STORE") == "memory" else None
    app = create_app(settings, model=DeltaModel(), store=store)
    bodies: dict[str, bytes] = {}

    @app.put("/bench/bare/{name}")
    async def set_bare(name: str, request: Request) -> Response:
        bodies[name] = await request.body()
        return Response(status_code=204)

    @app.post("/bench/bare/{name}")
    async def bare(name: str) -> Response:
        return Response(bodies[name], media_type="application/json")

    return app
