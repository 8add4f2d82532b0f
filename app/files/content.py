"""What an uploaded file is: its declared MIME type checked against its first bytes and, for
text, against UTF-8 as it streams past; the types the client previews; safe display names.

Pure functions over bytes and strings (no I/O), used by app.files.store while an upload
streams in, and by app.files.routes for the headers of a download.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from collections.abc import Callable
from urllib.parse import quote

from app.errors import ContentMismatchError, UnsupportedMediaTypeError

HEAD_BYTES = 32
"""Bytes needed to recognise a file's format from its signature."""


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
GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
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
