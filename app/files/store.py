"""Attachments kept in PostgreSQL: the ChatKit ``AttachmentStore`` (metadata and bytes).

What a file is (type, signature, text checks, names) is app.files.content; the signed URLs are
app.files.signing; reading a file out of a request body is app.files.uploads.

Metadata lives in ``chatkit_attachments`` (the ChatKit model as JSONB plus ``status``,
``size_bytes``, ``mime_type``); the bytes live in ``chatkit_attachment_blobs`` in
``CHUNK_SIZE`` chunks. Uploads are streamed: each chunk is inserted as soon as it is complete,
with a connection borrowed for that one statement, so neither memory nor a pooled connection is
tied to the size of the file or the speed of the client. An attachment is served only once it
is ``ready``; an upload that fails for any reason (too large, wrong type, client gone) deletes
the attachment, and ``ON DELETE CASCADE`` its chunks, so nothing is left behind.

Both upload strategies of the ChatKit client are supported:

* *two-phase*: ``create_attachment`` records a ``pending`` attachment and returns it with an
  ``upload_descriptor`` whose URL is absolute (``PUBLIC_BASE_URL``) and HMAC-signed; the client
  POSTs the bytes there (``app.files.routes``) without a Bearer token;
* *direct*: ``POST /files`` (``app.files.routes``) streams the bytes in and returns the attachment.

URLs that a browser follows without a Bearer token (the upload URL, an image's
``preview_url``) carry an HMAC over purpose, user, attachment id and expiry. They are re-signed
whenever an attachment is loaded (``PostgresStore(attachment_hook=...)``), so a stored thread
never serves dead links.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import asyncpg
from chatkit.store import AttachmentStore, NotFoundError
from chatkit.types import (
    Attachment,
    AttachmentCreateParams,
    AttachmentUploadDescriptor,
    FileAttachment,
    ImageAttachment,
)
from pydantic import AnyUrl, TypeAdapter

from app.errors import (
    ContentMismatchError,
    FileTooLargeError,
    InvalidInputError,
    UnsupportedMediaTypeError,
    UploadConflictError,
)
from app.files.content import (
    GENERIC_TYPES,
    HEAD_BYTES,
    PREVIEWABLE_IMAGE_TYPES,
    ContentCheck,
    mime_allowed,
    normalise_mime,
    sanitise_filename,
    sniff_mime,
)
from app.files.signing import FILES_PREFIX, Purpose, UrlSigner, signing_secret
from app.files.uploads import MULTIPART_OVERHEAD, UploadSource, open_body
from app.ids import new_id
from app.pg.sql import gated, gated_select, scoped_insert
from app.pg.store import PostgresStore, user_id_of
from app.settings import Settings

log = logging.getLogger(__name__)

CHUNK_SIZE = 256 * 1024
"""Bytes per blob row. Upload memory is about one chunk plus one network read per request."""
READ_BATCH = 4
"""Chunks fetched per query when streaming a file out (one short query per MiB)."""
_ATTACHMENT = TypeAdapter[Attachment](Attachment)


# --- errors -------------------------------------------------------------------------------


# --- the store ----------------------------------------------------------------------------

# Each statement sets ``app.user_id`` for the row-level security policies itself, in the shapes
# explained in app.pg.store (reads: fenced under the gate; inserts: values selected from the
# one-row relation that sets it; updates and deletes: the gate in their WHERE clause). $1 is
# always the user id.
SQL_INSERT = scoped_insert(
    "chatkit_attachments (user_id, id, thread_id, data, status, size_bytes, mime_type)",
    "$2::text, NULL, $3::jsonb, $4::text, $5::bigint, $6::text",
)
SQL_CLAIM = gated(
    "UPDATE chatkit_attachments SET status = 'uploading' "
    "WHERE user_id = $1 AND id = $2 AND status = 'pending'",
    "RETURNING size_bytes, mime_type, data::text",
)
SQL_EXISTS = gated_select("1", "SELECT 1 FROM chatkit_attachments WHERE user_id = $1 AND id = $2")
SQL_INSERT_CHUNK = scoped_insert(
    "chatkit_attachment_blobs (user_id, attachment_id, chunk_no, data)",
    "$2::text, $3::int, $4::bytea",
)
SQL_FINISH = gated(
    "UPDATE chatkit_attachments SET status = 'ready', size_bytes = $3, mime_type = $4, "
    "uploaded_at = now(), data = jsonb_set(data, '{upload_descriptor}', 'null'::jsonb) "
    "WHERE user_id = $1 AND id = $2 AND status = 'uploading'",
    "RETURNING data::text",
)
SQL_DISCARD = gated("DELETE FROM chatkit_attachments WHERE user_id = $1 AND id = $2")
SQL_FILE_INFO = gated_select(
    "q.size_bytes, q.mime_type, q.name, q.type",
    "SELECT size_bytes, mime_type, data->>'name' AS name, data->>'type' AS type "
    "FROM chatkit_attachments WHERE user_id = $1 AND id = $2 AND status = 'ready'",
)
SQL_FILES_INFO = gated_select(
    "q.id, q.size_bytes, q.mime_type, q.name, q.type",
    "SELECT id, size_bytes, mime_type, data->>'name' AS name, data->>'type' AS type "
    "FROM chatkit_attachments WHERE user_id = $1 AND id = ANY($2::text[]) AND status = 'ready'",
)
SQL_READ_CHUNKS = gated_select(
    "q.chunk_no, q.data",
    "SELECT chunk_no, data FROM chatkit_attachment_blobs "
    "WHERE user_id = $1 AND attachment_id = $2 AND chunk_no >= $3 ORDER BY chunk_no LIMIT $4",
    "q.chunk_no",
)


def _is_ours(url: AnyUrl, attachment_id: str, purpose: Purpose) -> bool:
    path = urlsplit(str(url)).path
    return path.endswith(f"{FILES_PREFIX}/{quote(attachment_id, safe='')}/{purpose}")


@dataclass(frozen=True)
class StoredFile:
    """What a download needs before its first byte: the ready attachment's metadata."""

    attachment_id: str
    name: str
    mime_type: str
    size: int
    is_image: bool


def _stored_file(
    attachment_id: str, size: int | None, mime: str | None, name: str | None, kind: str | None
) -> StoredFile:
    return StoredFile(
        attachment_id=attachment_id,
        name=name or "file",
        mime_type=mime or "application/octet-stream",
        size=int(size or 0),
        is_image=kind == "image" and mime in PREVIEWABLE_IMAGE_TYPES,
    )


class PgAttachmentStore(AttachmentStore[Any]):
    """``chatkit.store.AttachmentStore`` with the bytes in PostgreSQL, scoped to the user.

    Another user's attachment is indistinguishable from a missing one in every operation.
    Construct it with the ``PostgresStore`` whose pool it shares; ``install()`` makes that
    store re-sign attachment URLs whenever it loads one.
    """

    def __init__(
        self, store: PostgresStore, settings: Settings, signer: UrlSigner | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.signer = signer or UrlSigner(
            signing_secret(settings), settings.public_base_url, settings.signed_url_ttl_seconds
        )
        self._cleanups: set[asyncio.Task[None]] = set()

    def install(self) -> PgAttachmentStore:
        """Make ``self.store`` refresh signed URLs of every attachment it loads."""
        self.store.attachment_hook = self.refresh
        return self

    # --- ChatKit AttachmentStore --------------------------------------------------------

    def generate_attachment_id(self, mime_type: str, context: Any) -> str:
        return new_id("attachment")

    async def create_attachment(self, input: AttachmentCreateParams, context: Any) -> Attachment:
        """Phase one of a two-phase upload: a ``pending`` attachment and a signed upload URL."""
        user_id = user_id_of(context)
        mime = normalise_mime(input.mime_type)
        if not mime_allowed(mime, self.settings.allowed_mime_types):
            raise UnsupportedMediaTypeError()
        if input.size < 0:
            raise InvalidInputError("The declared size is invalid.")
        if input.size > self.settings.max_upload_bytes:
            raise FileTooLargeError()
        attachment_id = self.generate_attachment_id(mime, context)
        attachment = self._build(
            user_id, attachment_id, sanitise_filename(input.name), mime, upload=True
        )
        async with self.store.connection() as conn:
            await self.store.modify(
                conn,
                SQL_INSERT,
                user_id,
                attachment_id,
                attachment.model_dump_json(by_alias=True),
                "pending",
                input.size,
                mime,
            )
        return attachment

    async def delete_attachment(self, attachment_id: str, context: Any) -> None:
        """Delete the attachment with its bytes, as ``PostgresStore.delete_attachment`` does
        (the server then calls that one too: a no-op). A file that a sent message shows is
        refused (``AttachmentInUseError``) and kept whole: never its bytes without its row.

        Idempotent like the store's deletes: whoever handles the request checks that the
        attachment exists (and is the user's) first, so a client still gets a 404."""
        await self.store.delete_attachment(attachment_id, context)

    # --- URLs ---------------------------------------------------------------------------

    def _build(
        self, user_id: str, attachment_id: str, name: str, mime: str, *, upload: bool
    ) -> Attachment:
        descriptor = (
            AttachmentUploadDescriptor(
                url=AnyUrl(self.signer.url("upload", user_id, attachment_id)),
                method="POST",
                headers={},
            )
            if upload
            else None
        )
        if mime in PREVIEWABLE_IMAGE_TYPES:
            return ImageAttachment(
                id=attachment_id,
                name=name,
                mime_type=mime,
                upload_descriptor=descriptor,
                preview_url=AnyUrl(self.signer.url("preview", user_id, attachment_id)),
            )
        return FileAttachment(
            id=attachment_id, name=name, mime_type=mime, upload_descriptor=descriptor
        )

    def refresh(self, attachment: Attachment, user_id: str) -> Attachment:
        """Fresh signatures on an attachment's preview URL (and upload URL while pending).

        Only links to this service's own file endpoints are rewritten (whatever origin they
        were built with, so a changed ``PUBLIC_BASE_URL`` heals old links); others are kept.
        """
        update: dict[str, Any] = {}
        if isinstance(attachment, ImageAttachment) and _is_ours(
            attachment.preview_url, attachment.id, "preview"
        ):
            update["preview_url"] = AnyUrl(self.signer.url("preview", user_id, attachment.id))
        if attachment.upload_descriptor is not None and _is_ours(
            attachment.upload_descriptor.url, attachment.id, "upload"
        ):
            update["upload_descriptor"] = attachment.upload_descriptor.model_copy(
                update={"url": AnyUrl(self.signer.url("upload", user_id, attachment.id))}
            )
        return attachment.model_copy(update=update) if update else attachment

    # --- uploads ------------------------------------------------------------------------

    def _check_length(self, content_length: int | None) -> None:
        """Refuse a body announced as too large before reading any of it."""
        if content_length is not None and content_length > (
            self.settings.max_upload_bytes + MULTIPART_OVERHEAD
        ):
            raise FileTooLargeError()

    async def upload_direct(
        self,
        user_id: str,
        body: AsyncIterable[bytes],
        content_type: str | None,
        content_length: int | None = None,
    ) -> Attachment:
        """``POST /files``: a multipart body with a ``file`` field becomes a ready attachment."""
        self._check_length(content_length)
        max_bytes = self.settings.max_upload_bytes
        source = open_body(body, content_type, max_bytes, multipart_only=True)
        await source.start()
        name = sanitise_filename(source.filename)
        declared = normalise_mime(source.content_type)
        if declared in GENERIC_TYPES:
            declared = normalise_mime(mimetypes.guess_type(name, strict=False)[0])
        attachment_id = new_id("attachment")
        created = False

        async def create_row(mime: str) -> None:
            nonlocal created
            attachment = self._build(user_id, attachment_id, name, mime, upload=False)
            async with self.store.connection() as conn:
                await self.store.modify(
                    conn,
                    SQL_INSERT,
                    user_id,
                    attachment_id,
                    attachment.model_dump_json(by_alias=True),
                    "uploading",
                    None,
                    mime,
                )
            created = True

        try:
            size, mime = await self._ingest(
                user_id,
                attachment_id,
                source,
                declared=declared or None,
                declared_size=None,
                on_type_known=create_row,
            )
            return await self._finish(user_id, attachment_id, size, mime)
        except BaseException:
            if created:
                await self._discard(user_id, attachment_id)
            raise

    async def upload_to(
        self,
        user_id: str,
        attachment_id: str,
        body: AsyncIterable[bytes],
        content_type: str | None,
        content_length: int | None = None,
    ) -> Attachment:
        """Phase two: the bytes of a ``pending`` attachment (multipart ``file`` or raw body).

        The caller has verified the signed URL. Any failure deletes the attachment.
        """
        async with self.store.connection() as conn:
            row = await self.store.modify(conn, SQL_CLAIM, user_id, attachment_id, fetch="fetchrow")
            if row is None:
                if await conn.fetchval(SQL_EXISTS, user_id, attachment_id) is None:
                    raise NotFoundError(f"Attachment {attachment_id} not found")
                raise UploadConflictError()
        declared_size: int | None = row[0]
        mime: str = row[1] or _ATTACHMENT.validate_json(row[2]).mime_type
        try:
            self._check_length(content_length)
            source = open_body(
                body, content_type, self.settings.max_upload_bytes, multipart_only=False
            )
            await source.start()
            sent = normalise_mime(source.content_type)
            if sent not in GENERIC_TYPES and sent != mime:
                raise ContentMismatchError("The file's type differs from the one declared.")
            size, mime = await self._ingest(
                user_id, attachment_id, source, declared=mime, declared_size=declared_size
            )
            return await self._finish(user_id, attachment_id, size, mime)
        except BaseException:
            await self._discard(user_id, attachment_id)
            raise

    async def _ingest(
        self,
        user_id: str,
        attachment_id: str,
        source: UploadSource,
        *,
        declared: str | None,
        declared_size: int | None,
        on_type_known: Callable[[str], Awaitable[None]] | None = None,
    ) -> tuple[int, str]:
        """Stream ``source`` into blob rows; returns (size, verified MIME type)."""
        max_bytes = self.settings.max_upload_bytes
        buf = bytearray()
        total = 0
        chunk_no = 0
        check: ContentCheck | None = None

        async def type_known() -> ContentCheck:
            head = bytes(buf[:HEAD_BYTES])
            mime = declared or sniff_mime(head) or "application/octet-stream"
            if not mime_allowed(mime, self.settings.allowed_mime_types):
                raise UnsupportedMediaTypeError()
            new = ContentCheck(mime, head)
            new.feed(bytes(buf))
            if on_type_known is not None:
                await on_type_known(mime)
            return new

        async for piece in source.pieces():
            total += len(piece)
            if total > max_bytes:
                raise FileTooLargeError()
            if declared_size is not None and total > declared_size:
                raise ContentMismatchError("The file is larger than the size declared for it.")
            buf += piece
            if check is None:
                if len(buf) < HEAD_BYTES:
                    continue
                check = await type_known()
            else:
                check.feed(piece)
            while len(buf) >= CHUNK_SIZE:
                await self._insert_chunk(
                    user_id, attachment_id, chunk_no, bytes(memoryview(buf)[:CHUNK_SIZE])
                )
                del buf[:CHUNK_SIZE]
                chunk_no += 1
        if check is None:
            check = await type_known()
        check.finish()
        if declared_size is not None and total != declared_size:
            raise ContentMismatchError("The file is smaller than the size declared for it.")
        if buf:
            await self._insert_chunk(user_id, attachment_id, chunk_no, bytes(buf))
        return total, check.mime

    async def _insert_chunk(self, user_id: str, attachment_id: str, no: int, data: bytes) -> None:
        async with self.store.connection() as conn:
            try:
                await self.store.modify(conn, SQL_INSERT_CHUNK, user_id, attachment_id, no, data)
            except asyncpg.ForeignKeyViolationError as exc:  # deleted while uploading
                raise NotFoundError(f"Attachment {attachment_id} not found") from exc

    async def _finish(self, user_id: str, attachment_id: str, size: int, mime: str) -> Attachment:
        async with self.store.connection() as conn:
            data = await self.store.modify(
                conn, SQL_FINISH, user_id, attachment_id, size, mime, fetch="fetchval"
            )
        if data is None:
            raise NotFoundError(f"Attachment {attachment_id} not found")
        return self.refresh(_ATTACHMENT.validate_json(data), user_id)

    async def _discard(self, user_id: str, attachment_id: str) -> None:
        """Delete a failed upload (and, by cascade, its chunks), even if we are cancelled."""

        async def run() -> None:
            try:
                async with self.store.connection() as conn:
                    await self.store.modify(conn, SQL_DISCARD, user_id, attachment_id)
            except Exception:
                # prune removes it later (never attached): nothing is served meanwhile
                log.exception("could not discard failed upload %s", attachment_id)

        task = asyncio.ensure_future(run())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        await asyncio.shield(task)

    # --- downloads ----------------------------------------------------------------------

    async def file_info(self, user_id: str, attachment_id: str) -> StoredFile:
        """A ready attachment of this user, or ``NotFoundError``."""
        async with self.store.connection() as conn:
            row = await conn.fetchrow(SQL_FILE_INFO, user_id, attachment_id)
        if row is None:
            raise NotFoundError(f"Attachment {attachment_id} not found")
        return _stored_file(attachment_id, *row)

    async def files_info(self, user_id: str, attachment_ids: list[str]) -> dict[str, StoredFile]:
        """The ready attachments of this user among ``attachment_ids``, in one query (a reply
        plans the files of its whole history at once); missing or others' ids are absent."""
        if not attachment_ids:
            return {}
        async with self.store.connection() as conn:
            rows = await conn.fetch(SQL_FILES_INFO, user_id, attachment_ids)
        return {row[0]: _stored_file(row[0], *row[1:]) for row in rows}

    async def iter_chunks(self, user_id: str, attachment_id: str) -> AsyncGenerator[bytes, None]:
        """The file's chunks in order, ``READ_BATCH`` per short query: no connection is held
        while the consumer (a slow client, say) takes its time."""
        next_no = 0
        while True:
            async with self.store.connection() as conn:
                rows = await conn.fetch(
                    SQL_READ_CHUNKS, user_id, attachment_id, next_no, READ_BATCH
                )
            for no, data in rows:
                if no != next_no:
                    raise RuntimeError(f"attachment {attachment_id} is missing chunk {next_no}")
                next_no += 1
                yield data
            if len(rows) < READ_BATCH:
                return

    async def read_bytes(
        self, user_id: str, attachment_id: str, limit: int | None = None
    ) -> tuple[StoredFile, bytes]:
        """The file's metadata and up to ``limit`` of its bytes (all when ``None``)."""
        info = await self.file_info(user_id, attachment_id)
        want = info.size if limit is None else min(limit, info.size)
        out = bytearray()
        if want > 0:
            async with contextlib.aclosing(self.iter_chunks(user_id, attachment_id)) as chunks:
                async for chunk in chunks:
                    out += chunk
                    if len(out) >= want:
                        break
        return info, bytes(out[:want])
