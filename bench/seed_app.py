"""The seeds' design running the scripted agent: the baseline of ``bench.turn_bench`` (issue 21:
server CPU per turn).

What the SDK's examples and most tutorials build: the SDK's own ``chatkit.server.ChatKitServer``,
unmodified, over an in-memory dict store (``bench.memory_store.MemoryStore``), behind a FastAPI
``POST /chatkit`` route that checks the bearer JWT with PyJWT; its ``respond`` loads the thread's
recent items, converts them with the SDK's ``ThreadItemConverter``, runs an Agents SDK agent
(``Runner.run_streamed``, tracing off as chatkit-pg runs it) and hands the run to the SDK's
``stream_agent_response``. The agent's model is the soak's scripted model
(``bench.soak_app.SoakModel``), the one chatkit-pg's side runs: the same turns, the same deltas
at the same pace. No rate limit, no stream lease, no database, no logging per stream.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import jwt
from agents import Agent, RunConfig, Runner
from chatkit.agents import AgentContext, ThreadItemConverter, stream_agent_response
from chatkit.server import ChatKitServer, StreamingResult
from chatkit.types import ThreadMetadata, ThreadStreamEvent, UserMessageItem
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response, StreamingResponse

from bench.memory_store import MemoryStore
from bench.soak_app import SoakModel

Context = dict[str, Any]
HISTORY_ITEMS = 20


class SeedServer(ChatKitServer[Context]):
    def __init__(self, store: MemoryStore) -> None:
        super().__init__(store)
        self.agent: Agent[AgentContext[Context]] = Agent(
            name="Assistant", instructions="You are a helpful assistant.", model=SoakModel()
        )
        self.converter = ThreadItemConverter()
        self.run_config = RunConfig(tracing_disabled=True)

    async def respond(
        self, thread: ThreadMetadata, input_user_message: UserMessageItem | None, context: Context
    ) -> AsyncIterator[ThreadStreamEvent]:
        page = await self.store.load_thread_items(thread.id, None, HISTORY_ITEMS, "desc", context)
        agent_input = await self.converter.to_agent_input(list(reversed(page.data)))
        agent_context = AgentContext(thread=thread, store=self.store, request_context=context)
        result = Runner.run_streamed(
            self.agent, agent_input, context=agent_context, run_config=self.run_config
        )
        async for event in stream_agent_response(agent_context, result):
            yield event


def create_seed_app() -> FastAPI:
    secret = os.environ["BENCH_JWT_SECRET"]
    algorithms = [os.environ.get("BENCH_JWT_ALGORITHM", "HS256")]
    server = SeedServer(MemoryStore())
    app = FastAPI()

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
