"""The floor for a list request, the server benchmark's baseline (issue 14): the least any server
must do to answer ``threads.list`` / ``items.list`` from our tables, and nothing else.

Per request: read the body, verify the bearer JWT with PyJWT (same secret and algorithm as the
app in the benchmark, ``exp`` required, no cache), run one query on ``chatkit_threads`` /
``chatkit_items`` from a plain asyncpg pool (the user's rows in the store's keyset order,
``created_at, seq``, ``LIMIT page + 1``; no reset query on release, like the app's pool), and
join the stored JSON (the ``data`` column as text) into the page ``{"data": [...], "has_more":
..., "after": ...}``. No framework (a bare ASGI callable), no validation, no rate limit, no
row-level-security gate: whatever chatkit-pg spends above this is its overhead. Served by its
own uvicorn process with the app's settings.

``create_floor_app`` reads ``BENCH_DSN``, ``BENCH_JWT_SECRET``, ``BENCH_JWT_ALGORITHM`` and
``BENCH_POOL_SIZE`` (see ``bench.httpload.baseline_env``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import asyncpg
import jwt

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

APPLICATION_NAME = "bench-floor"
DEFAULT_PAGE = 20  # the SDK's DEFAULT_PAGE_SIZE
MAX_PAGE = 100


def _page_sql(table: str, scope: str) -> dict[str, str]:
    """The store's first-page query without its gate: keyset order, the limit last."""
    n = scope.count("$") + 1
    return {
        order: f"SELECT id, data::text FROM {table} WHERE {scope} "
        f"ORDER BY created_at {order}, seq {order} LIMIT ${n}"
        for order in ("asc", "desc")
    }


THREADS_SQL = _page_sql("chatkit_threads", "user_id = $1")
ITEMS_SQL = _page_sql("chatkit_items", "user_id = $1 AND thread_id = $2")


async def _no_reset(conn: asyncpg.Connection) -> None:
    """No reset query on release (asyncpg's default costs a round trip per request; the app's
    pool skips it too): a read-only statement leaves nothing to reset."""


class FloorApp:
    def __init__(self, dsn: str, secret: str, algorithm: str, pool_size: int) -> None:
        self.dsn = dsn
        self.secret = secret
        self.algorithms = [algorithm]
        self.pool_size = pool_size
        self.pool: asyncpg.Pool | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            status, body = await self._answer(scope, receive)
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=self.pool_size,
                    max_size=self.pool_size,
                    server_settings={"application_name": APPLICATION_NAME},
                    reset=_no_reset,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.pool is not None:
                    await self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _answer(self, scope: Scope, receive: Receive) -> tuple[int, bytes]:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        if scope["method"] != "POST" or scope["path"] != "/chatkit":
            return 404, b'{"error":"not found"}'
        user = self._user(dict(scope["headers"]).get(b"authorization", b""))
        if user is None:
            return 401, b'{"error":"unauthorized"}'
        try:
            request = json.loads(b"".join(chunks))
            params = request.get("params") or {}
            limit = min(int(params.get("limit") or DEFAULT_PAGE), MAX_PAGE)
            order = "asc" if params.get("order") == "asc" else "desc"
            kind = request["type"]
            if kind == "threads.list":
                sql, args = THREADS_SQL[order], [user]
            elif kind == "items.list":
                sql, args = ITEMS_SQL[order], [user, str(params["thread_id"])]
            else:
                return 400, b'{"error":"unsupported"}'
        except (ValueError, KeyError, TypeError, AttributeError):
            return 400, b'{"error":"bad request"}'
        assert self.pool is not None
        rows = await self.pool.fetch(sql, *args, limit + 1)
        has_more = len(rows) > limit
        rows = rows[:limit]
        tail = f',"after":{json.dumps(rows[-1][0])}}}' if has_more else "}"
        data = ",".join(r[1] for r in rows)
        return 200, f'{{"data":[{data}],"has_more":{"true" if has_more else "false"}{tail}'.encode()

    def _user(self, authorization: bytes) -> str | None:
        scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            claims = jwt.decode(
                token.strip(), self.secret, algorithms=self.algorithms, options={"require": ["exp"]}
            )
        except jwt.PyJWTError:
            return None
        user = claims.get("sub")
        return user if isinstance(user, str) and user else None


def create_floor_app() -> FloorApp:
    return FloorApp(
        os.environ["BENCH_DSN"],
        os.environ["BENCH_JWT_SECRET"],
        os.environ.get("BENCH_JWT_ALGORITHM", "HS256"),
        int(os.environ.get("BENCH_POOL_SIZE", "20")),
    )
