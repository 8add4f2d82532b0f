"""Attachments kept in PostgreSQL: the ChatKit ``AttachmentStore``, signed URLs, content checks.

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
  POSTs the bytes there (``app.files``) without a Bearer token;
* *direct*: ``POST /files`` (``app.files``) streams the bytes in and returns the attachment.

URLs that a browser follows without a Bearer token (the upload URL, an image's
``preview_url``) carry an HMAC over purpose, user, attachment id and expiry. They are re-signed
whenever an attachment is loaded (``PostgresStore(attachment_hook=...)``), so a stored thread
never serves dead links.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import hashlib
import hmac
import logging
import mimetypes
import os
import re
import secrets
import time
import unicodedata
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

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
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import AppError, InvalidInputError, PayloadTooLargeError
from .ids import new_id
from .settings import Settings
from .sql import gated, gated_select, scoped_insert
from .store import PostgresStore, user_id_of

log = logging.getLogger(__name__)

FILES_PREFIX = "/files"
CHUNK_SIZE = 256 * 1024
"""Bytes per blob row. Upload memory is about one chunk plus one network read per request."""
READ_BATCH = 4
"""Chunks fetched per query when streaming a file out (one short query per MiB)."""
HEAD_BYTES = 32
"""Bytes needed to recognise a file's format from its signature."""
MULTIPART_OVERHEAD = 64 * 1024
"""Allowance over MAX_UPLOAD_BYTES for multipart boundaries and part headers."""

Purpose = Literal["upload", "preview"]
_ATTACHMENT = TypeAdapter[Attachment](Attachment)


# --- errors -------------------------------------------------------------------------------


class FileTooLargeError(PayloadTooLargeError):
    """The service-wide 413, with a message about files rather than request bodies."""

    public_message = "The file is larger than the maximum allowed size."


class UnsupportedMediaTypeError(AppError):
    status_code = 415
    code = "unsupported_media_type"
    public_message = "This type of file is not allowed."


class ContentMismatchError(InvalidInputError):
    code = "content_mismatch"
    public_message = "The file's content does not match its declared type or size."


class UploadConflictError(AppError):
    status_code = 409
    code = "upload_conflict"
    public_message = "This attachment has already been uploaded."


class InvalidSignatureError(AppError):
    status_code = 403
    code = "invalid_signature"
    public_message = "This link is invalid or has expired."


# --- MIME types and content checks -------------------------------------------------------

PREVIEWABLE_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
"""Images shown inline by the client and sent to the model as image inputs."""

_TEXT_APPLICATION_TYPES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/x-ndjson",
        "application/yaml",
        "application/x-yaml",
        "application/toml",
        "application/javascript",
        "application/sql",
        "image/svg+xml",
    }
)


def _ftyp(*brands: bytes) -> Callable[[bytes], bool]:
    return lambda h: h[4:8] == b"ftyp" and h[8:12] in brands


_ZIP = (b"PK\x03\x04", b"PK\x05\x06")
SIGNATURES: dict[str, Callable[[bytes], bool]] = {
    "image/png": lambda h: h.startswith(b"\x89PNG\r\n\x1a\n"),
    "image/jpeg": lambda h: h.startswith(b"\xff\xd8\xff"),
    "image/gif": lambda h: h[:6] in (b"GIF87a", b"GIF89a"),
    "image/webp": lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP",
    "image/bmp": lambda h: h[:2] == b"BM",
    "image/tiff": lambda h: h[:4] in (b"II*\x00", b"MM\x00*"),
    "image/avif": _ftyp(b"avif", b"avis"),
    "image/heic": _ftyp(b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"),
    "image/heif": _ftyp(b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"),
    "image/x-icon": lambda h: h[:4] == b"\x00\x00\x01\x00",
    "image/vnd.microsoft.icon": lambda h: h[:4] == b"\x00\x00\x01\x00",
    "application/pdf": lambda h: h.startswith(b"%PDF-"),
    "application/zip": lambda h: h[:4] in _ZIP,
    "application/gzip": lambda h: h[:2] == b"\x1f\x8b",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": lambda h: (
        h[:4] in _ZIP
    ),
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": lambda h: h[:4] in _ZIP,
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": lambda h: (
        h[:4] in _ZIP
    ),
}
"""Magic bytes of the formats we can verify. A declared type listed here must match them."""

_SNIFF_ORDER = ("image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf")
_GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_MIME_RE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")


def normalise_mime(value: str | None) -> str:
    """``Text/Plain; charset=UTF-8`` → ``text/plain``; anything unparseable → ``""``."""
    if not value:
        return ""
    mime = value.split(";", 1)[0].strip().lower()
    return mime if _MIME_RE.match(mime) else ""


def mime_allowed(mime: str, allowed: list[str]) -> bool:
    if not mime:
        return False
    family = mime.split("/", 1)[0] + "/*"
    return any(a in (mime, family, "*/*") for a in allowed)


def is_text_like(mime: str) -> bool:
    return (
        mime.startswith("text/")
        or mime in _TEXT_APPLICATION_TYPES
        or mime.endswith(("+json", "+xml"))
    )


def sniff_mime(head: bytes) -> str | None:
    """The type a file's first bytes prove, for uploads that declare none."""
    for mime in _SNIFF_ORDER:
        if SIGNATURES[mime](head):
            return mime
    return None


class ContentCheck:
    """Checks that the bytes arriving are what their type says, as they stream past.

    Formats with a known signature must start with it; an image whose signature we do not
    know is refused (we could not tell it from anything else); text must be UTF-8 without NUL.
    """

    def __init__(self, mime: str, head: bytes) -> None:
        self.mime = mime
        signature = SIGNATURES.get(mime)
        if signature is not None:
            if not signature(head):
                raise ContentMismatchError("The file's content does not match its type.")
        elif mime.startswith("image/") and not is_text_like(mime):
            raise UnsupportedMediaTypeError("This image format cannot be verified.")
        self._text = codecs.getincrementaldecoder("utf-8")("strict") if is_text_like(mime) else None

    def feed(self, data: bytes) -> None:
        if self._text is None:
            return
        if b"\x00" in data:
            raise ContentMismatchError("A text file may not contain NUL bytes.")
        try:
            self._text.decode(data)
        except UnicodeDecodeError as exc:
            raise ContentMismatchError("A text file must be UTF-8.") from exc

    def finish(self) -> None:
        if self._text is not None:
            try:
                self._text.decode(b"", final=True)
            except UnicodeDecodeError as exc:
                raise ContentMismatchError("A text file must be UTF-8.") from exc


# --- names --------------------------------------------------------------------------------

_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\]+")


def sanitise_filename(name: str | None, default: str = "file") -> str:
    """A display name: no path, no control characters, at most 255 characters."""
    if not name:
        return default
    name = unicodedata.normalize("NFC", name)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_NAME.sub("_", name).strip().strip(".") or default
    if len(name) > 255:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 254 - len(ext)] + dot + ext) if dot and len(ext) <= 16 else name[:255]
    return name


def content_disposition(name: str, *, inline: bool) -> str:
    """RFC 6266: an ASCII ``filename`` fallback plus the exact name as ``filename*``."""
    name = sanitise_filename(name)
    ascii_name = "".join(
        c if 0x20 <= ord(c) < 0x7F and c not in '"\\;%' else "_" for c in name
    ).strip()
    kind = "inline" if inline else "attachment"
    return f"{kind}; filename=\"{ascii_name or 'file'}\"; filename*=UTF-8''{quote(name, safe='')}"


# --- signing ------------------------------------------------------------------------------


def signing_secret(settings: Settings) -> bytes:
    """``ATTACHMENT_SIGNING_SECRET``, else a random key kept in ``DATA_DIR`` (development).

    Several replicas must share one key: set the variable in production.
    """
    if settings.attachment_signing_secret is not None:
        return settings.attachment_signing_secret.get_secret_value().encode()
    path = Path(settings.data_dir) / "attachment-signing.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


class UrlSigner:
    """HMAC-SHA256 over (purpose, user, attachment, expiry) for URLs without a Bearer token.

    Expiry times are rounded up to a step of a tenth of the TTL, so loading a thread twice in a
    row yields the same preview URL and the browser's cache keeps working.
    """

    def __init__(
        self,
        secret: bytes,
        base_url: str,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the URL signing secret must be at least 16 bytes")
        self._key = hashlib.sha256(b"chatkit-pg attachment urls\x00" + secret).digest()
        self.base_url = base_url.rstrip("/")
        self.ttl = ttl_seconds
        self._step = max(1, ttl_seconds // 10)
        self._clock = clock

    def expiry(self) -> int:
        deadline = int(self._clock()) + self.ttl
        return -(-deadline // self._step) * self._step

    def signature(self, purpose: Purpose, user_id: str, attachment_id: str, expires: int) -> str:
        msg = "\x00".join(("v1", purpose, user_id, attachment_id, str(expires))).encode()
        digest = hmac.new(self._key, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def url(self, purpose: Purpose, user_id: str, attachment_id: str) -> str:
        expires = self.expiry()
        query = urlencode(
            {
                "u": user_id,
                "e": expires,
                "s": self.signature(purpose, user_id, attachment_id, expires),
            }
        )
        return f"{self.base_url}{FILES_PREFIX}/{quote(attachment_id, safe='')}/{purpose}?{query}"

    def verify(
        self,
        purpose: Purpose,
        user_id: str | None,
        attachment_id: str,
        expires: str | None,
        signature: str | None,
    ) -> int:
        """Return the expiry time, or raise ``InvalidSignatureError`` (forged, altered, expired)."""
        if not user_id or not expires or not signature or not expires.isdigit():
            raise InvalidSignatureError()
        exp = int(expires)
        good = self.signature(purpose, user_id, attachment_id, exp)
        if not hmac.compare_digest(good.encode(), signature.encode()):
            raise InvalidSignatureError()
        if exp < self._clock():
            raise InvalidSignatureError("This link has expired.")
        return exp


# --- request bodies -----------------------------------------------------------------------


class _Source:
    """The bytes of one uploaded file, read from a request body as they arrive."""

    filename: str | None = None
    content_type: str | None = None

    async def start(self) -> None:
        """Read until the file's own headers are known."""

    def pieces(self) -> AsyncIterator[bytes]:
        raise NotImplementedError


class _RawSource(_Source):
    def __init__(self, body: AsyncIterable[bytes], content_type: str | None) -> None:
        self._body = body
        self.content_type = content_type

    async def pieces(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            if chunk:
                yield chunk


class _MultipartSource(_Source):
    """Streams the part named ``file`` out of a multipart/form-data body; other parts are
    skipped without being kept. A body that ends before its closing boundary is refused."""

    def __init__(self, body: AsyncIterable[bytes], boundary: bytes, max_body: int) -> None:
        self._body = body.__aiter__()
        self._max_body = max_body
        self._received = 0
        self._out: list[bytes] = []
        self._headers: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._in_file = False
        self._found = False
        self._complete = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )

    # parser callbacks (synchronous)
    def _on_part_begin(self) -> None:
        self._headers = {}
        self._in_file = False

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode(
            "latin-1"
        ).strip()
        self._field.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition"))
        if options.get(b"name") == b"file" and not self._found:
            self._found = self._in_file = True
            raw = options.get(b"filename")
            self.filename = raw.decode("utf-8", "replace") if raw is not None else None
            self.content_type = self._headers.get("content-type")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._out.append(data[start:end])

    def _on_part_end(self) -> None:
        self._in_file = False

    def _on_end(self) -> None:
        self._complete = True

    async def _read(self) -> bool:
        """Feed the parser one network read; False once the body has ended."""
        try:
            chunk = await self._body.__anext__()
        except StopAsyncIteration:
            return False
        self._received += len(chunk)
        if self._received > self._max_body:
            raise FileTooLargeError()
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise InvalidInputError("The multipart body is malformed.") from exc
        return True

    async def start(self) -> None:
        while not self._found:
            if not await self._read():
                raise InvalidInputError("The request has no 'file' field.")

    async def pieces(self) -> AsyncIterator[bytes]:
        while True:
            out, self._out = self._out, []
            for piece in out:
                yield piece
            if not await self._read():
                break
        if not self._complete:
            raise InvalidInputError("The multipart body ended early.")


def open_body(
    body: AsyncIterable[bytes], content_type: str | None, max_bytes: int, *, multipart_only: bool
) -> _Source:
    mime, options = parse_options_header(content_type)
    if mime == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise InvalidInputError("The multipart body has no boundary.")
        return _MultipartSource(body, boundary, max_bytes + MULTIPART_OVERHEAD)
    if multipart_only:
        raise InvalidInputError("Send the file as multipart/form-data in a field named 'file'.")
    return _RawSource(body, content_type)


# --- the store ----------------------------------------------------------------------------

# Each statement sets ``app.user_id`` for the row-level security policies itself, in the shapes
# explained in app.store (reads: fenced under the gate; inserts: values selected from the
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
SQL_READ_CHUNKS = gated_select(
    "q.chunk_no, q.data",
    "SELECT chunk_no, data FROM chatkit_attachment_blobs "
    "WHERE user_id = $1 AND attachment_id = $2 AND chunk_no >= $3 ORDER BY chunk_no LIMIT $4",
    "q.chunk_no",
)
SQL_DELETE_BLOBS = gated(
    "DELETE FROM chatkit_attachment_blobs WHERE user_id = $1 AND attachment_id = $2"
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
        """Delete the bytes; the server then calls ``Store.delete_attachment`` for the row.

        Idempotent like the store's deletes: whoever handles the request checks that the
        attachment exists (and is the user's) first, so a client still gets a 404."""
        async with self.store.connection() as conn:
            await self.store.modify(conn, SQL_DELETE_BLOBS, user_id_of(context), attachment_id)

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
        if declared in _GENERIC_TYPES:
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
            if sent not in _GENERIC_TYPES and sent != mime:
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
        source: _Source,
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
        return StoredFile(
            attachment_id=attachment_id,
            name=row[2] or "file",
            mime_type=row[1] or "application/octet-stream",
            size=int(row[0] or 0),
            is_image=row[3] == "image" and row[1] in PREVIEWABLE_IMAGE_TYPES,
        )

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
