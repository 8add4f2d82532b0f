"""A user's data as one ZIP archive, produced as a stream of bytes (docs/userdata.md).

ZIP rather than tar: a tar member's size goes before its bytes, so a JSON Lines file of unknown
length would have to be buffered or spooled first; a ZIP member written to a stream that cannot
seek carries its sizes after its bytes (a data descriptor), so every member is written as its
rows arrive and nothing is held back but the central directory (a few hundred bytes per member).

``ZipStream`` wraps ``zipfile`` over a sink that only collects what it is given; after each
write the caller takes the collected bytes (``drain``) and passes them on (to a file, to an HTTP
response). Memory is the sink's last write plus the compressor's window: one stored chunk of an
attachment, one JSON line.

Layout (format version 1):

* ``threads.jsonl``: one JSON object per thread (id, created_at, updated_at, title, data);
* ``items.jsonl``: every item, thread by thread in the order of ``threads.jsonl``, each thread's
  items in order (thread_id, id, created_at, type, data: the ChatKit item as stored);
* ``feedback.jsonl``: thread_id, item_id, kind, created_at;
* ``attachments.jsonl``: each attachment's metadata and ``file``, its path in the archive
  (null when its upload never finished, so there are no bytes to give);
* ``files/<attachment id>/<name>``: the bytes, as uploaded, stored uncompressed;
* ``plugins/<plugin>/<table>.jsonl``: what each plugin's ``export_user`` hook yields;
* ``manifest.json`` (last): format, version, user, time, counts, and every other member's size
  and SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import IO, Any

from app.files.content import sanitise_filename

FORMAT = "chatkit-pg.user-export"
VERSION = 1
MEDIA_TYPE = "application/zip"
FLUSH_BYTES = 64 * 1024
"""JSON lines are handed on in pieces of about this size, not one small piece per row."""

_SAFE_PART = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class _Sink:
    """A write-only file for ``zipfile``: keeps what it is given until drained. It has no
    ``tell`` or ``seek``, so ``zipfile`` streams (data descriptors, no rewriting)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def safe_part(value: str, fallback: str) -> str:
    """``value`` as one path segment of the archive, or a digest of it when it is not a plain
    identifier (no separators, no ``..``, nothing a tool could read as a path)."""
    if _SAFE_PART.fullmatch(value) and value.strip(".") == value:
        return value
    return f"{fallback}-{hashlib.sha256(value.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


def json_default(value: Any) -> Any:
    """Plugin rows may hold what asyncpg returns: timestamps, decimals, UUIDs, bytes."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


@dataclass
class Member:
    size: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)


class ZipStream:
    """Members written one after the other; ``drain()`` after each write hands the bytes on."""

    def __init__(self, when: datetime | None = None) -> None:
        self._sink = _Sink()
        self._zip = zipfile.ZipFile(self._sink, "w", allowZip64=True)
        self._when = (when or datetime.now(UTC)).timetuple()[:6]
        self.members: dict[str, Member] = {}
        self._open: IO[bytes] | None = None
        self._member: Member | None = None

    @property
    def pending(self) -> int:
        """Bytes written out by ``zipfile`` and not yet drained."""
        return len(self._sink.buffer)

    def drain(self) -> bytes:
        out = bytes(self._sink.buffer)
        self._sink.buffer.clear()
        return out

    def open(self, name: str, *, compress: bool = True) -> None:
        """Start a member (the previous one is closed)."""
        self.close_member()
        if name in self.members:
            raise ValueError(f"archive member {name} written twice")
        info = zipfile.ZipInfo(name, self._when)
        info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        # The size is not known in advance: the 64-bit sizes allow any.
        self._open = self._zip.open(info, "w", force_zip64=True)
        self._member = self.members[name] = Member()

    def write(self, data: bytes) -> None:
        assert self._open is not None and self._member is not None
        self._open.write(data)
        self._member.size += len(data)
        self._member.sha256.update(data)

    def close_member(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None
            self._member = None

    def close(self) -> bytes:
        """End the archive (the central directory); the last bytes to hand on."""
        self.close_member()
        self._zip.close()
        return self.drain()

    def abandon(self) -> None:
        """After a failure: end the archive quietly and drop what was not handed on, so the
        collector finds nothing to close (the receiver's copy lacks its end: it does not open)."""
        with contextlib.suppress(Exception):  # nothing is sent any more: objects are released
            self.close_member()
            self._zip.close()
        self._sink.buffer.clear()

    def digests(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"size": m.size, "sha256": m.sha256.hexdigest()}
            for name, m in self.members.items()
        }


async def write_lines(
    archive: ZipStream, name: str, lines: AsyncGenerator[str, None]
) -> AsyncIterator[bytes]:
    """A JSON Lines member from ``lines`` (each one JSON text); yields the archive's bytes as
    they come."""
    archive.open(name)
    async with contextlib.aclosing(lines) as rows:
        async for line in rows:
            archive.write(line.encode() + b"\n")
            if archive.pending >= FLUSH_BYTES:
                yield archive.drain()
    archive.close_member()
    out = archive.drain()
    if out:
        yield out


def file_path(attachment_id: str, name: str | None) -> str:
    return f"files/{safe_part(attachment_id, 'attachment')}/{sanitise_filename(name)}"


def attachment_line(row: Mapping[str, Any], path: str | None) -> str:
    created = row["created_at"]
    return json.dumps(
        {
            "id": row["id"],
            "thread_id": row["thread_id"],
            "name": row["name"],
            "mime_type": row["mime_type"],
            "size_bytes": row["size_bytes"],
            "status": row["status"],
            "created_at": created.isoformat() if created is not None else None,
            "file": path,
            "data": json.loads(row["data"]),
        },
        ensure_ascii=False,
    )


def manifest(archive: ZipStream, user_id: str, when: datetime, counts: Mapping[str, Any]) -> bytes:
    return json.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "user_id": user_id,
            "exported_at": when.isoformat(),
            "counts": counts,
            "files": archive.digests(),
        },
        ensure_ascii=False,
        indent=2,
        default=json_default,
    ).encode()
