"""File bytes in model input: bounded per model request, read once per reply, never left behind.

Why: a thread's history is converted to model input on every turn, and each attachment in it
became a base64 ``data:`` URL (4/3 of the file) in that input, once per occurrence. One user
could send a 20 MiB image ten times per message and grow the server by gigabytes in five
messages, and the Agents SDK keeps its input in objects that refer to each other (the run
result, its state, the context wrapper), which only the garbage collector's rare full passes
free: every turn's copies outlived it. So:

* **a budget** (``plan``): before the history is converted, the attachments of its user
  messages are looked up in one query and placed newest first within ``MODEL_INPUT_FILE_BYTES``
  (counted before base64; a text file costs what is sent of it). A file that no longer fits is
  replaced by a note saying it was omitted; a file already sent in a newer message by a note
  saying so (one request carries each file once); an id repeated in one message counts once;
* **placeholders**: conversion puts a small marker (a per-reply nonce and the attachment id)
  where the bytes go, so what the SDK keeps for the reply's lifetime, cycles included, is small;
* **one read per reply** (``model_input``, the run's ``call_model_input_filter``): just before
  each model call the markers become the file's content, read from PostgreSQL chunk by chunk
  straight into base64 (no whole-file ``bytes`` copy) once per reply and shared by every model
  call of the reply (a tool loop) and every message that shows it;
* **released** (``release``) when the reply ends, however it ends: the SDK's leftover objects
  then hold markers only, and each turn's working set is freed with the turn.
"""

from __future__ import annotations

import binascii
import contextlib
import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from agents import RunConfig, TResponseInputItem
from agents.run_config import CallModelData, ModelInputData
from chatkit.store import NotFoundError
from chatkit.types import Attachment, ThreadItem, UserMessageItem
from openai.types.responses import (
    ResponseInputContentParam,
    ResponseInputFileParam,
    ResponseInputImageParam,
    ResponseInputTextParam,
)

from app.files.content import PREVIEWABLE_IMAGE_TYPES, is_text_like
from app.files.store import PgAttachmentStore, StoredFile

log = logging.getLogger(__name__)

FileKind = Literal["image", "pdf", "text", "other"]
Action = Literal["send", "shown_later", "omitted", "missing", "describe"]
ImageDetail = Literal["low", "high", "auto"]
MARKER = "chatkit-pg-file:"
_FIELD = {"input_image": "image_url", "input_file": "file_data", "input_text": "text"}


def unique_attachments(attachments: Iterable[Attachment]) -> list[Attachment]:
    """The attachments with repeated ids dropped (the first of each kept, in order)."""
    seen: set[str] = set()
    out = []
    for attachment in attachments:
        if attachment.id not in seen:
            seen.add(attachment.id)
            out.append(attachment)
    return out


def quote_name(name: str) -> str:
    return '"' + name.replace('"', "'").replace("\n", " ") + '"'


def text_part(text: str) -> ResponseInputTextParam:
    return ResponseInputTextParam(type="input_text", text=text)


def size_text(n: int) -> str:
    """``32 MiB``, ``640 KiB``, ``12 bytes``: a size as a person reads it."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{n} bytes"


def file_kind(info: StoredFile, *, pdf_as_file: bool) -> FileKind:
    if info.mime_type in PREVIEWABLE_IMAGE_TYPES:
        return "image"
    if is_text_like(info.mime_type):
        return "text"
    if info.mime_type == "application/pdf" and pdf_as_file:
        return "pdf"
    return "other"


def unavailable_note(name: str) -> str:
    return f"[The user attached {quote_name(name)}, but the file is no longer available.]"


def describe_note(info: StoredFile, name: str) -> str:
    return (
        f"[The user attached the file {quote_name(name)} ({info.mime_type}, {info.size} bytes); "
        "its content cannot be shown to you.]"
    )


async def read_data_url(store: PgAttachmentStore, user_id: str, info: StoredFile) -> str | None:
    """``data:<mime>;base64,...`` of a stored file, or None if it changed or went away.

    Encoded chunk by chunk into one buffer of the final size, so the peak is that buffer plus
    the string made of it (2x the base64 size), never the raw file besides."""
    prefix = f"data:{info.mime_type};base64,".encode("ascii")
    out = bytearray(len(prefix) + 4 * ((info.size + 2) // 3))
    out[: len(prefix)] = prefix
    pos = len(prefix)
    carry = b""
    read = 0
    async with contextlib.aclosing(store.iter_chunks(user_id, info.attachment_id)) as chunks:
        async for chunk in chunks:
            read += len(chunk)
            if read > info.size:
                return None
            data = carry + chunk if carry else chunk
            whole = len(data) - len(data) % 3
            encoded = binascii.b2a_base64(memoryview(data)[:whole], newline=False)
            out[pos : pos + len(encoded)] = encoded
            pos += len(encoded)
            carry = bytes(data[whole:])
    if carry:
        encoded = binascii.b2a_base64(carry, newline=False)
        out[pos : pos + len(encoded)] = encoded
        pos += len(encoded)
    if read != info.size or pos != len(out):
        return None
    return out.decode("ascii")


async def read_text(
    store: PgAttachmentStore, user_id: str, info: StoredFile, name: str, max_bytes: int
) -> str:
    """A text file as the model reads it: named, typed, cut at ``max_bytes`` (and saying so)."""
    _, data = await store.read_bytes(user_id, info.attachment_id, max_bytes)
    truncated = info.size > len(data)
    text = data.decode("utf-8", "ignore" if truncated else "replace")
    note = (
        f"\n[Truncated: the first {len(data)} of {info.size} bytes are shown.]" if truncated else ""
    )
    quoted = quote_name(name)
    return (
        f"The user attached the file {quoted} ({info.mime_type}, {info.size} bytes). "
        f"Its content:\n<file name={quoted}>\n{text}\n</file>{note}"
    )


@dataclass(frozen=True)
class Placement:
    """Where one attachment of one message stands in this reply's model requests."""

    action: Action
    info: StoredFile | None = None


class ReplyFiles:
    """The files of one reply's model input: planned, resolved once, released at the end.

    Made by ``AttachmentConverter.to_agent_input`` (one per reply); the server passes
    ``run_config(...)`` to the run and calls ``release()`` when the reply ends."""

    def __init__(
        self,
        store: PgAttachmentStore,
        user_id: str,
        *,
        budget: int,
        text_max_bytes: int,
        pdf_as_file: bool = True,
        image_detail: ImageDetail = "auto",
    ) -> None:
        self.store = store
        self.user_id = user_id
        self.budget = budget
        self.text_max_bytes = text_max_bytes
        self.pdf_as_file = pdf_as_file
        self.image_detail: ImageDetail = image_detail
        # Unguessable, so text a user typed can never be taken for a marker.
        self._prefix = f"{MARKER}{secrets.token_hex(12)}:"
        self._places: dict[tuple[str, str], Placement] = {}
        self._sent: dict[str, tuple[StoredFile, str]] = {}  # id -> (file, name shown)
        self._cache: dict[str, str] = {}
        self._released = False
        self.planned_bytes = 0
        self.omitted = 0

    # --- planning ----------------------------------------------------------------------

    def cost(self, info: StoredFile) -> int:
        """Bytes a file adds to a model request (before base64)."""
        kind = file_kind(info, pdf_as_file=self.pdf_as_file)
        if kind == "text":
            return min(info.size, self.text_max_bytes)
        return 0 if kind == "other" else info.size

    async def plan(self, items: Sequence[ThreadItem]) -> None:
        """Place every attachment of ``items`` (oldest first, as sent), newest first."""
        messages = [i for i in items if isinstance(i, UserMessageItem) and i.attachments]
        ids = list(dict.fromkeys(a.id for m in messages for a in m.attachments))
        infos = await self.store.files_info(self.user_id, ids)
        remaining = self.budget
        for message in reversed(messages):
            for attachment in unique_attachments(message.attachments):
                info = infos.get(attachment.id)
                place: Placement
                if info is None:
                    place = Placement("missing")
                elif file_kind(info, pdf_as_file=self.pdf_as_file) == "other":
                    place = Placement("describe", info)
                elif attachment.id in self._sent:
                    place = Placement("shown_later", info)
                elif self.cost(info) <= remaining:
                    remaining -= self.cost(info)
                    self._sent[attachment.id] = (info, attachment.name)
                    place = Placement("send", info)
                else:
                    self.omitted += 1
                    place = Placement("omitted", info)
                self._places[(message.id, attachment.id)] = place
        self.planned_bytes = self.budget - remaining
        if self._places:
            log.info(
                "model input files",
                extra={
                    "files_sent": len(self._sent),
                    "file_bytes": self.planned_bytes,
                    "files_omitted": self.omitted,
                },
            )

    def placement(self, message_id: str, attachment_id: str) -> Placement | None:
        return self._places.get((message_id, attachment_id))

    def part(self, place: Placement, attachment: Attachment) -> ResponseInputContentParam:
        """The model input part of a planned attachment: a marker where its bytes go, or a note."""
        name = quote_name(attachment.name)
        info = place.info
        if place.action == "missing" or info is None:
            return text_part(unavailable_note(attachment.name))
        kind = file_kind(info, pdf_as_file=self.pdf_as_file)
        noun = "image" if kind == "image" else "file"
        if place.action == "describe":
            return text_part(describe_note(info, attachment.name))
        if place.action == "shown_later":
            return text_part(
                f"[The {noun} {name} is attached again later in this conversation; "
                "it is shown there.]"
            )
        if place.action == "omitted":
            return text_part(
                f"[The {noun} {name} that the user attached here was omitted: this request "
                f"can carry only {size_text(self.budget)} of files, and newer ones come first. "
                "Ask the user to attach it again if you need it.]"
            )
        marker = self._prefix + attachment.id
        if kind == "image":
            return ResponseInputImageParam(
                type="input_image", detail=self.image_detail, image_url=marker
            )
        if kind == "pdf":
            return ResponseInputFileParam(
                type="input_file", file_data=marker, filename=attachment.name
            )
        return text_part(marker)

    # --- resolving, once per reply ----------------------------------------------------------

    def run_config(self, base: RunConfig) -> RunConfig:
        """``base`` with the markers resolved before each model call."""
        return replace(base, call_model_input_filter=self.model_input)

    async def model_input(self, data: CallModelData[Any]) -> ModelInputData:
        """``call_model_input_filter``: the request with every marker replaced by its file.

        Messages holding markers are copied (the SDK's own input keeps the markers); the rest
        pass through as they are."""
        return ModelInputData(
            input=await self.resolve(data.model_data.input),
            instructions=data.model_data.instructions,
        )

    async def resolve(self, items: Sequence[TResponseInputItem]) -> list[TResponseInputItem]:
        """``items`` with every marker replaced by its file (what a model call is sent)."""
        out: list[Any] = []
        for item in items:
            content = item.get("content") if isinstance(item, dict) else None
            if isinstance(content, list) and any(self._marker_of(p) for p in content):
                out.append({**item, "content": [await self._resolve(p) for p in content]})
            else:
                out.append(item)
        return out

    def _marker_of(self, part: Any) -> str | None:
        if not isinstance(part, dict):
            return None
        field = _FIELD.get(str(part.get("type")))
        value = part.get(field) if field else None
        if isinstance(value, str) and value.startswith(self._prefix):
            return value[len(self._prefix) :]
        return None

    async def _resolve(self, part: Any) -> Any:
        attachment_id = self._marker_of(part)
        if attachment_id is None:
            return part
        sent = self._sent.get(attachment_id)
        if sent is None:  # not a marker this reply made
            return part
        info, name = sent
        content = self._cache.get(attachment_id)
        if content is None:
            content = await self._read(info, name)
            if content is None:
                return text_part(unavailable_note(name))
            if not self._released:
                self._cache[attachment_id] = content
        return {**part, _FIELD[part["type"]]: content}

    async def _read(self, info: StoredFile, name: str) -> str | None:
        try:
            if file_kind(info, pdf_as_file=self.pdf_as_file) == "text":
                return await read_text(self.store, self.user_id, info, name, self.text_max_bytes)
            return await read_data_url(self.store, self.user_id, info)
        except NotFoundError:  # deleted since the plan
            return None

    def release(self) -> None:
        """Drop the files read for this reply (the reply is over)."""
        self._released = True
        self._cache.clear()
