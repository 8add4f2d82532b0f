"""HTTP endpoints for attachment bytes: uploads (both ChatKit strategies), downloads, previews.

``files_router(get_user_id)`` returns a FastAPI ``APIRouter``; the app plugs its own
authentication in as ``get_user_id`` (a FastAPI dependency returning the user id).

* ``POST /files`` (user from ``get_user_id``): direct upload, multipart field ``file``;
* ``POST|PUT /files/{id}/upload?u&e&s`` (signed URL): the two-phase upload descriptor's URL;
* ``GET /files/{id}`` (user): download, as an attachment;
* ``GET /files/{id}/preview?u&e&s`` (signed URL): an image's ``preview_url``, inline;
* ``DELETE /files/{id}`` (user): delete the attachment and its bytes.

Another user's file answers exactly like a missing one (404). Errors are JSON
``{"error": {"code": ..., "message": ...}}`` with messages written for the client.
"""

# No ``from __future__ import annotations``: FastAPI must see the dependency in the closure.
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Annotated, Any

from chatkit.store import NotFoundError
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from app.errors import AppError
from app.files.content import content_disposition
from app.files.signing import FILES_PREFIX
from app.files.store import PgAttachmentStore, StoredFile
from app.files.uploads import declared_length
from app.ids import check_id

NOT_FOUND_MESSAGE = "File not found."

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # Bytes from users are never a document this origin runs: no scripts, no plugins, no frames.
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Referrer-Policy": "no-referrer",
}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=status,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
    )


class FilesRoute(APIRoute):
    """Maps the service's errors to JSON inside the router, so it works in any app."""

    handle_errors = True

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        handle_errors = self.handle_errors

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientDisconnect:
                # Nobody is listening any more; the upload has already been discarded.
                return error_response(400, "client_disconnected", "The upload was interrupted.")
            except NotFoundError:
                if not handle_errors:
                    raise
                return error_response(404, "not_found", NOT_FOUND_MESSAGE)
            except AppError as exc:
                if not handle_errors:
                    raise
                return error_response(exc.status_code, exc.code, exc.message)

        return run


class _AppHandledRoute(FilesRoute):
    handle_errors = False


def _content_length(request: Request) -> int | None:
    return declared_length(request.headers.get("content-length"))


def _attachment_json(attachment: Any) -> JSONResponse:
    return JSONResponse(
        attachment.model_dump(mode="json", by_alias=True, context={"exclude_metadata": True}),
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


def files_router(
    get_user_id: Callable[..., Awaitable[str]],
    attachments: PgAttachmentStore | None = None,
    *,
    handle_errors: bool = True,
) -> APIRouter:
    """The file endpoints. ``attachments`` defaults to ``request.app.state.attachment_store``
    (so an app may build its stores at startup, after the router exists). With
    ``handle_errors=False`` the service's errors go to the app's own exception handlers."""

    route_class = FilesRoute if handle_errors else _AppHandledRoute
    router = APIRouter(prefix=FILES_PREFIX, tags=["files"], route_class=route_class)
    User = Annotated[str, Depends(get_user_id)]

    def store_of(request: Request) -> PgAttachmentStore:
        store = attachments or getattr(request.app.state, "attachment_store", None)
        if not isinstance(store, PgAttachmentStore):  # this deployment keeps no files
            raise NotFoundError("file storage is not configured")
        return store

    def stream(
        store: PgAttachmentStore,
        user_id: str,
        info: StoredFile,
        *,
        inline: bool,
        cache: str,
    ) -> StreamingResponse:
        chunks: AsyncIterator[bytes] = store.iter_chunks(user_id, info.attachment_id)
        return StreamingResponse(
            chunks,
            media_type=info.mime_type,
            headers={
                "Content-Length": str(info.size),
                "Content-Disposition": content_disposition(info.name, inline=inline),
                "Cache-Control": cache,
                **SECURITY_HEADERS,
            },
        )

    @router.post("")
    async def upload_direct(request: Request, user_id: User) -> Response:
        """Direct upload: multipart/form-data with the file in a field named ``file``."""
        attachment = await store_of(request).upload_direct(
            user_id,
            request.stream(),
            request.headers.get("content-type"),
            _content_length(request),
        )
        return _attachment_json(attachment)

    @router.api_route("/{attachment_id}/upload", methods=["POST", "PUT"])
    async def upload_two_phase(
        request: Request,
        attachment_id: str,
        u: str | None = None,
        e: str | None = None,
        s: str | None = None,
    ) -> Response:
        """Second phase of a two-phase upload, at the signed URL of the upload descriptor.

        No Bearer token: the ChatKit client sends only the descriptor's headers; the signature
        names the user. The body is multipart (field ``file``) or the raw bytes.
        """
        check_id(attachment_id, "attachment_id")
        store = store_of(request)
        store.signer.verify("upload", u, attachment_id, e, s)
        assert u is not None
        attachment = await store.upload_to(
            u,
            attachment_id,
            request.stream(),
            request.headers.get("content-type"),
            _content_length(request),
        )
        return _attachment_json(attachment)

    @router.get("/{attachment_id}")
    async def download(request: Request, attachment_id: str, user_id: User) -> Response:
        check_id(attachment_id, "attachment_id")
        store = store_of(request)
        info = await store.file_info(user_id, attachment_id)
        return stream(store, user_id, info, inline=False, cache="private, no-store")

    @router.get("/{attachment_id}/preview")
    async def preview(
        request: Request,
        attachment_id: str,
        u: str | None = None,
        e: str | None = None,
        s: str | None = None,
    ) -> Response:
        """The ``preview_url`` of an image: signed, because an ``<img>`` sends no Bearer."""
        check_id(attachment_id, "attachment_id")
        store = store_of(request)
        expires = store.signer.verify("preview", u, attachment_id, e, s)
        assert u is not None
        info = await store.file_info(u, attachment_id)
        max_age = max(0, min(expires - int(time.time()), 86400))
        return stream(store, u, info, inline=info.is_image, cache=f"private, max-age={max_age}")

    @router.delete("/{attachment_id}")
    async def delete(request: Request, attachment_id: str, user_id: User) -> Response:
        check_id(attachment_id, "attachment_id")
        store = store_of(request)
        context = {"user_id": user_id}
        # The deletes are idempotent; a missing or foreign id must still be a 404.
        await store.store.load_attachment(attachment_id, context)
        await store.delete_attachment(attachment_id, context)
        await store.store.delete_attachment(attachment_id, context)
        return Response(status_code=204)

    return router
