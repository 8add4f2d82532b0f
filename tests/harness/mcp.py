"""The backend and the task-manager MCP example, both over real HTTP on loopback.

The example server runs in-process under uvicorn, behind a recorder that keeps every HTTP
request it received (headers and body), so tests can assert what reached it. The backend is a
real uvicorn server too: the example fetches its JWKS over HTTP, as it would in production.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import jwt
from agents import Model
from mcp import Client
from mcp_types import CallToolResult

from app.main import create_app
from app.settings import Settings
from examples.mcp_tasks.identity import IDENTITY_META_KEY
from examples.mcp_tasks.server import TasksConfig, TasksServer
from examples.mcp_tasks.store import asyncpg_dsn
from tests.harness.chatkit_client import ChatKitClient, parse_sse, token_for, user_input
from tests.harness.loopback import bound_socket, serve


@dataclass
class Received:
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body.startswith(b"{") else None


@dataclass
class Recorder:
    """ASGI middleware keeping every HTTP request the wrapped app received."""

    app: Any
    requests: list[Received] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = Received([(k.decode(), v.decode()) for k, v in scope["headers"]], b"")
        self.requests.append(record)

        async def recording_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                record.body += message.get("body", b"")
            return message

        await self.app(scope, recording_receive, send)

    def tool_calls(self) -> list[dict[str, Any]]:
        """The params of every ``tools/call`` JSON-RPC request received."""
        calls = []
        for request in self.requests:
            message = request.json()
            if isinstance(message, dict) and message.get("method") == "tools/call":
                calls.append(message["params"])
        return calls

    def everything(self) -> str:
        """All headers and bodies received, as one text to search."""
        parts = []
        for request in self.requests:
            parts.extend(f"{k}: {v}" for k, v in request.headers)
            parts.append(request.body.decode(errors="replace"))
        return "\n".join(parts)


@dataclass
class Stack:
    backend_url: str
    mcp_url: str
    settings: Settings
    client: ChatKitClient
    recorder: Recorder
    tasks: TasksServer
    database_url: str

    @property
    def jwks_url(self) -> str:
        return f"{self.backend_url}/.well-known/jwks.json"

    def bearer(self, user: str) -> str:
        return token_for(user, self.settings)

    async def chat(self, type_: str, params: dict[str, Any], *, token: str) -> list[dict[str, Any]]:
        """A streamed ChatKit request with exactly this bearer token; its events."""
        response = await self.client.post(
            {"type": type_, "params": params},
            user=None,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 200, response.text
        return parse_sse(response.text)

    async def create_thread(self, text: str, *, token: str) -> tuple[str, list[dict[str, Any]]]:
        events = await self.chat("threads.create", {"input": user_input(text)}, token=token)
        created = [e for e in events if e["type"] == "thread.created"]
        assert created, events
        return created[0]["thread"]["id"], events

    async def send(self, thread_id: str, text: str, *, token: str) -> list[dict[str, Any]]:
        return await self.chat(
            "threads.add_user_message",
            {"thread_id": thread_id, "input": user_input(text)},
            token=token,
        )

    async def rows(self) -> list[dict[str, Any]]:
        conn = await asyncpg.connect(asyncpg_dsn(self.database_url))
        try:
            records = await conn.fetch(
                "SELECT id, user_id, title, done, thread_id FROM mcp_tasks.tasks ORDER BY id"
            )
        finally:
            await conn.close()
        return [dict(r) for r in records]

    async def call_tool(
        self, name: str, arguments: dict[str, Any], meta: dict[str, Any] | None
    ) -> CallToolResult:
        """A direct MCP call to the example server (no backend involved)."""
        async with Client(self.mcp_url) as mcp:
            return await mcp.call_tool(name, arguments, meta=meta)  # type: ignore[arg-type]

    async def jwks(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            response = await http.get(self.jwks_url)
        assert response.status_code == 200
        return dict(response.json())

    async def decode_identity(self, token: str, *, user: str | None = None) -> dict[str, Any]:
        """An identity token the backend sent, verified with its published key."""
        header = jwt.get_unverified_header(token)
        (jwk,) = [k for k in (await self.jwks())["keys"] if k["kid"] == header["kid"]]
        claims: dict[str, Any] = jwt.decode(
            token,
            jwt.PyJWK(jwk).key,
            algorithms=["EdDSA"],
            audience=self.mcp_url,
            issuer=self.backend_url,
        )
        assert header["alg"] == "EdDSA"
        assert 0 < claims["exp"] - claims["iat"] <= 300
        assert claims["iat"] <= time.time() + 1
        if user is not None:
            assert claims["sub"] == user
        return claims


def identity_meta(token: str) -> dict[str, Any]:
    return {IDENTITY_META_KEY: token}


async def drop_tasks_schema(database_url: str) -> None:
    """Leave the shared test database as migrated (the example creates its schema at startup)."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute("DROP SCHEMA IF EXISTS mcp_tasks CASCADE")
    finally:
        await conn.close()


@asynccontextmanager
async def task_stack(settings: Settings, database_url: str, model: Model) -> AsyncIterator[Stack]:
    """The example MCP server, then the backend using it, both listening on loopback."""
    backend_sock, mcp_sock = bound_socket(), bound_socket()
    backend_url = f"http://127.0.0.1:{backend_sock.getsockname()[1]}"
    mcp_url = f"http://127.0.0.1:{mcp_sock.getsockname()[1]}/mcp"
    tasks = TasksServer(
        TasksConfig(
            audience=mcp_url,
            issuer=backend_url,
            jwks_url=f"{backend_url}/.well-known/jwks.json",
            database_url=database_url,
        )
    )
    recorder = Recorder(tasks.asgi_app())
    settings = settings.model_copy(
        update={"public_base_url": backend_url, "mcp_server_urls": [mcp_url]}
    )
    app = create_app(settings, model=model)
    try:
        async with (
            serve(recorder, sock=mcp_sock),
            serve(app, sock=backend_sock),
            httpx.AsyncClient(base_url=backend_url, timeout=30) as http,
        ):
            yield Stack(
                backend_url,
                mcp_url,
                settings,
                ChatKitClient(app, http, settings),
                recorder,
                tasks,
                database_url,
            )
    finally:
        await drop_tasks_schema(database_url)
