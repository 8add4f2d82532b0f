"""``GET {CHATKIT_PATH}/threads/search?q=…&limit=…&after=…``: the user's own thread search, as
JSON, for the frontend's search box and any other client (docs/search.md).

``search_router(get_user_id, chatkit_path)`` returns a FastAPI ``APIRouter``; the app plugs in
the dependency its other JSON routes use (Bearer authentication, then the per-user rate
limiter), so a search costs one request of the user's budget like any other. Mistakes are 400s
raised as the app's errors (``InvalidInputError`` with the offending ``field``), mapped to JSON
by the app's handlers; nothing of an exception's text reaches the client.

The answer: ``{"data": [{"thread_id", "item_id", "title", "rank", "snippet": [{"text", "hit"}]}],
"after": cursor or null}``; ``item_id`` is null for a title match; ``snippet`` is plain text in
pieces, the matched words marked ``hit``, for clients to render as text, never as markup.
"""

# No ``from __future__ import annotations``: FastAPI must see the dependency in the closure.
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from app.errors import InvalidInputError
from app.http.runtime import Runtime
from app.pg.search import MAX_LIMIT, ThreadSearch

DEFAULT_LIMIT = 20
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isascii() or not raw.isdigit() or len(raw) > 4:
        raise InvalidInputError(f"limit must be between 1 and {MAX_LIMIT}.", field="limit")
    return int(raw)  # the range is checked with the query (app.pg.search)


def search_router(get_user_id: Callable[..., Awaitable[str]], chatkit_path: str) -> APIRouter:
    router = APIRouter(prefix=chatkit_path.rstrip("/"), tags=["search"])
    User = Annotated[str, Depends(get_user_id)]

    @router.get("/threads/search")
    async def search(
        request: Request,
        user_id: User,
        q: str | None = None,
        limit: str | None = None,
        after: str | None = None,
    ) -> JSONResponse:
        runtime: Runtime = request.app.state.runtime
        page = await ThreadSearch(runtime.pool).search(user_id, q, limit=_limit(limit), after=after)
        return JSONResponse(page.as_json(), headers=HEADERS)

    return router
