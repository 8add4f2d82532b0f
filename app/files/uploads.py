"""The bytes of one uploaded file, read from a request body as they arrive: a raw body, or the
part named ``file`` of a multipart/form-data body (other parts skipped, never kept; a body that
ends before its closing boundary refused). Nothing is buffered beyond one network read.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import FileTooLargeError, InvalidInputError
from app.sanitize import ascii_int

MULTIPART_OVERHEAD = 64 * 1024
"""Allowance over MAX_UPLOAD_BYTES for multipart boundaries and part headers."""


def declared_length(value: str | None) -> int | None:
    """A request's ``Content-Length``: None when absent, a 400 when not 1 to 18 ASCII digits
    (RFC 9110: ``1*DIGIT``; 18 digits fit a signed 64-bit integer). uvicorn's parser refuses
    such headers already; this keeps the app's answer a 400 under any server."""
    if value is None:
        return None
    size = ascii_int(value, 18)
    if size is None:
        raise InvalidInputError("Invalid Content-Length header.")
    return size


class UploadSource:
    """The bytes of one uploaded file, read from a request body as they arrive."""

    filename: str | None = None
    content_type: str | None = None

    async def start(self) -> None:
        """Read until the file's own headers are known."""

    def pieces(self) -> AsyncIterator[bytes]:
        raise NotImplementedError


class _RawSource(UploadSource):
    def __init__(self, body: AsyncIterable[bytes], content_type: str | None) -> None:
        self._body = body
        self.content_type = content_type

    async def pieces(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            if chunk:
                yield chunk


class _MultipartSource(UploadSource):
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
        except FormParserError as exc:
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
) -> UploadSource:
    mime, options = parse_options_header(content_type)
    if mime == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise InvalidInputError("The multipart body has no boundary.")
        try:
            return _MultipartSource(body, boundary, max_bytes + MULTIPART_OVERHEAD)
        except FormParserError:  # e.g. longer than the parser takes (RFC 2046: 70)
            raise InvalidInputError("The multipart boundary is invalid.") from None
    if multipart_only:
        raise InvalidInputError("Send the file as multipart/form-data in a field named 'file'.")
    return _RawSource(body, content_type)
