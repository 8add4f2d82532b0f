"""The task manager MCP server: add, list and complete tasks, per verified user.

Settings (environment variables):

* ``TASKS_AUDIENCE``: this server's MCP URL exactly as listed in the backend's
  ``MCP_SERVER_URLS`` (the ``aud`` its tokens carry); default ``http://127.0.0.1:8001/mcp``.
* ``TASKS_ISSUER``: the backend's ``PUBLIC_BASE_URL``; default ``PUBLIC_BASE_URL`` or
  ``http://127.0.0.1:8000``.
* ``TASKS_JWKS_URL``: where the backend's public keys are; default
  ``TASKS_ISSUER/.well-known/jwks.json``.
* ``TASKS_DATABASE_URL``: PostgreSQL for the tasks; default ``DATABASE_URL``, else the
  embedded PostgreSQL ``make run`` uses (same ``DATA_DIR``).
* ``TASKS_HOST`` / ``TASKS_PORT``: where to listen; default ``127.0.0.1`` / ``8001``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.routing import Mount

from .identity import Identity, IdentityError, IdentityVerifier, ReplayGuard
from .store import TaskStore

log = logging.getLogger("examples.mcp_tasks")
T = TypeVar("T")

INSTRUCTIONS = (
    "Keeps the user's to-do list. Use add_task to note something the user wants to do, "
    "list_tasks to show what is open (or everything), complete_task to tick one off by its id."
)


@dataclass(frozen=True)
class TasksConfig:
    audience: str
    issuer: str
    jwks_url: str
    database_url: str
    host: str = "127.0.0.1"
    port: int = 8001

    @property
    def path(self) -> str:
        return urlsplit(self.audience).path or "/mcp"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TasksConfig:
        env = os.environ if env is None else env
        issuer = (
            env.get("TASKS_ISSUER") or env.get("PUBLIC_BASE_URL") or "http://127.0.0.1:8000"
        ).rstrip("/")
        database_url = env.get("TASKS_DATABASE_URL") or env.get("DATABASE_URL")
        if not database_url:
            # Next to `make run`: the same embedded PostgreSQL, started if it is not running.
            from app.pg.engine import resolve_database_url
            from app.settings import Settings

            database_url = resolve_database_url(Settings())
        return cls(
            audience=env.get("TASKS_AUDIENCE") or "http://127.0.0.1:8001/mcp",
            issuer=issuer,
            jwks_url=env.get("TASKS_JWKS_URL") or f"{issuer}/.well-known/jwks.json",
            database_url=database_url,
            host=env.get("TASKS_HOST") or "127.0.0.1",
            port=int(env.get("TASKS_PORT") or 8001),
        )


class TasksServer:
    """The MCP tools and their ASGI app; the database pool and key cache live in its lifespan."""

    def __init__(self, config: TasksConfig, *, verifier: IdentityVerifier | None = None) -> None:
        self.config = config
        self.verifier = verifier or IdentityVerifier(
            config.jwks_url, issuer=config.issuer, audience=config.audience
        )
        self.replays = ReplayGuard(leeway_seconds=self.verifier.leeway_seconds)
        self.store = TaskStore(config.database_url)
        self.mcp = self._build_mcp()

    async def as_caller(
        self,
        ctx: Context,
        tool: str,
        arguments: Mapping[str, Any],
        action: Callable[[Identity], Awaitable[T]],
    ) -> T:
        """Run ``action`` for the verified user of this tool call, once per identity token
        (a replayed token is refused; the same call resent gets the first answer). Any doubt
        about the token refuses the call."""
        try:
            who = await self.verifier.verify_meta(ctx.request_context.meta)
            return await self.replays.run_once(who, tool, arguments, lambda: action(who))
        except IdentityError as exc:
            log.info("refused a tool call: %s", exc)
            raise ToolError(f"Refused: {exc}.") from None

    def _build_mcp(self) -> MCPServer:
        mcp = MCPServer("chatkit-pg tasks", instructions=INSTRUCTIONS)

        @mcp.tool()
        async def add_task(title: str, ctx: Context) -> dict[str, Any]:
            """Add a task to the user's list; returns it with its id."""

            async def add(who: Identity) -> dict[str, Any]:
                text = title.strip()
                if not 1 <= len(text) <= 500:
                    raise ToolError("A task needs a title of 1 to 500 characters.")
                return await self.store.add(who.user_id, text, who.thread_id)

            return await self.as_caller(ctx, "add_task", {"title": title}, add)

        @mcp.tool()
        async def list_tasks(ctx: Context, include_done: bool = False) -> dict[str, Any]:
            """The user's open tasks (with include_done, completed ones too), oldest first."""

            async def tasks(who: Identity) -> dict[str, Any]:
                return {"tasks": await self.store.tasks_of(who.user_id, include_done=include_done)}

            return await self.as_caller(ctx, "list_tasks", {"include_done": include_done}, tasks)

        @mcp.tool()
        async def complete_task(task_id: int, ctx: Context) -> dict[str, Any]:
            """Mark one of the user's tasks as done, by its id."""

            async def complete(who: Identity) -> dict[str, Any]:
                task = await self.store.complete(who.user_id, task_id)
                if task is None:
                    raise ToolError(f"There is no task {task_id}.")
                return task

            return await self.as_caller(ctx, "complete_task", {"task_id": task_id}, complete)

        return mcp

    def asgi_app(self) -> Starlette:
        host = urlsplit(self.config.audience).netloc
        mcp_app = self.mcp.streamable_http_app(
            streamable_http_path=self.config.path,
            # DNS-rebinding protection: only the host the backend is configured to call.
            transport_security=TransportSecuritySettings(
                allowed_hosts=[host, "127.0.0.1:*", "localhost:*"], allowed_origins=[]
            ),
        )

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            await self.store.open()
            try:
                async with mcp_app.router.lifespan_context(mcp_app):
                    yield
            finally:
                await self.verifier.aclose()
                await self.store.close()

        return Starlette(routes=[Mount("/", app=mcp_app)], lifespan=lifespan)


def main() -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = TasksConfig.from_env()
    log.info(
        "task manager MCP server at %s (tokens from %s, keys at %s)",
        config.audience,
        config.issuer,
        config.jwks_url,
    )
    uvicorn.run(
        TasksServer(config).asgi_app(), host=config.host, port=config.port, log_level="info"
    )
    return 0
