"""``GET /me/export``: the signed-in user's own data, as the archive ``users export`` writes.

Authenticated and counted by the same dependency as ``/files`` (the Bearer token, then one
request of the user's rate limit), then streamed as it is produced (app.chat.userdata): memory
and pooled connections stay bounded whatever the user holds, and a slow client holds no
connection between pages. One export per user runs at a time in a process; a second one is a
429 while the first streams. The first piece is produced before the response starts, so a
database that is away is a JSON 503 rather than a cut-off download; a failure after that ends
the download early, and the archive, lacking its central directory, does not open.
"""

# No ``from __future__ import annotations``: FastAPI must see the dependency in the closure.
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from app.chat.userdata import export_archive
from app.errors import TooManyRequestsError
from app.files.export import MEDIA_TYPE
from app.http.runtime import Runtime

log = logging.getLogger(__name__)

EXPORT_PATH = "/me/export"
HEADERS = {
    "Content-Disposition": 'attachment; filename="chatkit-export.zip"',
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


def me_router(get_user_id: Callable[..., Awaitable[str]]) -> APIRouter:
    router = APIRouter()
    exporting: set[str] = set()  # users whose export this process is streaming

    @router.get(EXPORT_PATH)
    async def export(
        request: Request, user_id: Annotated[str, Depends(get_user_id)]
    ) -> StreamingResponse:
        runtime: Runtime = request.app.state.runtime
        if user_id in exporting:
            raise TooManyRequestsError("An export of your data is already running.", retry_after=10)
        exporting.add(user_id)
        stream = export_archive(runtime.pool, runtime.server.plugins, user_id)
        try:
            first = await anext(stream)
        except BaseException:
            exporting.discard(user_id)
            await stream.aclose()
            raise

        async def body() -> AsyncIterator[bytes]:
            try:
                yield first
                async for piece in stream:
                    yield piece
            except Exception:
                log.exception("export stopped before its end")
                raise
            finally:
                exporting.discard(user_id)
                await stream.aclose()

        return StreamingResponse(body(), media_type=MEDIA_TYPE, headers=HEADERS)

    return router
