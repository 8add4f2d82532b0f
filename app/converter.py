"""Attachments as model input: ``ThreadItemConverter.attachment_to_message_content``.

The SDK hands the converter only the attachment, not the request context, so a converter is
bound to the user whose thread it converts: ``AttachmentConverter(store).for_user(user_id)``
(cheap; make one per request). Bytes are read through ``PgAttachmentStore``, scoped to that
user, so a message can never carry another user's file to the model.

* previewable images (PNG, JPEG, GIF, WebP) → ``input_image`` with a ``data:`` URL (what the
  Responses and Chat Completions APIs both accept for private files);
* text-like files → ``input_text`` with the file's content, cut at ``ATTACHMENT_TEXT_MAX_BYTES``;
* PDFs → ``input_file`` with ``file_data`` (a ``data:`` URL) and the filename, unless
  ``pdf_as_file=False`` for providers without file inputs;
* anything else, or a file no longer there → a short ``input_text`` description.

Every user message with attachments also gets a note naming them (``attachments_note``), so a
model knows what the user attached even when a part carries no name (an image), and the
offline demo model can acknowledge them (``attachment_names``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any, Literal

from agents import TResponseInputItem
from chatkit.store import NotFoundError
from chatkit.types import Attachment, UserMessageItem
from openai.types.responses import (
    ResponseInputContentParam,
    ResponseInputFileParam,
    ResponseInputImageParam,
    ResponseInputTextParam,
)

from .attachments import PgAttachmentStore
from .content import PREVIEWABLE_IMAGE_TYPES, is_text_like
from .errors import MissingUserError
from .server import PgThreadItemConverter

NOTE_PREFIX = "[The user attached: "
NOTE_SUFFIX = "]"


def attachments_note(attachments: Sequence[Attachment]) -> str:
    """``[The user attached: "a.png", "notes.txt"]`` (names JSON-quoted)."""
    names = ", ".join(json.dumps(a.name, ensure_ascii=False) for a in attachments)
    return f"{NOTE_PREFIX}{names}{NOTE_SUFFIX}"


def attachment_names(input: str | list[Any]) -> list[str]:
    """The attachment names noted in the user's latest turn (after the last assistant item)."""
    if isinstance(input, str):
        return []
    for item in reversed(input):
        if not isinstance(item, dict) or item.get("role") == "assistant":
            return []
        content = item.get("content")
        if item.get("role") != "user" or not isinstance(content, list):
            continue
        for part in content:
            text = part.get("text") if isinstance(part, dict) else None
            if (
                isinstance(text, str)
                and part.get("type") == "input_text"
                and text.startswith(NOTE_PREFIX)
                and text.endswith(NOTE_SUFFIX)
            ):
                try:
                    names = json.loads("[" + text[len(NOTE_PREFIX) : -len(NOTE_SUFFIX)] + "]")
                except ValueError:
                    return []
                return [str(n) for n in names]
    return []


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _quote(name: str) -> str:
    return '"' + name.replace('"', "'").replace("\n", " ") + '"'


class AttachmentConverter(PgThreadItemConverter):
    def __init__(
        self,
        attachments: PgAttachmentStore,
        user_id: str | None = None,
        *,
        text_max_bytes: int | None = None,
        pdf_as_file: bool = True,
        image_detail: Literal["low", "high", "auto"] = "auto",
    ) -> None:
        self.attachments = attachments
        self.user_id = user_id
        self.text_max_bytes = text_max_bytes or attachments.settings.attachment_text_max_bytes
        self.pdf_as_file = pdf_as_file
        self.image_detail: Literal["low", "high", "auto"] = image_detail

    def for_user(self, user_id: str) -> AttachmentConverter:
        """The same converter, reading files as ``user_id``."""
        return AttachmentConverter(
            self.attachments,
            user_id,
            text_max_bytes=self.text_max_bytes,
            pdf_as_file=self.pdf_as_file,
            image_detail=self.image_detail,
        )

    async def user_message_to_input(
        self, item: UserMessageItem, is_last_message: bool = True
    ) -> TResponseInputItem | list[TResponseInputItem] | None:
        converted = await super().user_message_to_input(item, is_last_message)
        if not item.attachments or not isinstance(converted, list) or not converted:
            return converted
        message: Any = converted[0]
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            # right after the typed text, before the attachments themselves
            content.insert(1, self._text(attachments_note(item.attachments)))
        return converted

    def _text(self, text: str) -> ResponseInputTextParam:
        return ResponseInputTextParam(type="input_text", text=text)

    async def attachment_to_message_content(
        self, attachment: Attachment
    ) -> ResponseInputContentParam:
        if self.user_id is None:
            raise MissingUserError("AttachmentConverter used without a user: call for_user()")
        name = _quote(attachment.name)
        store = self.attachments
        try:
            info = await store.file_info(self.user_id, attachment.id)
        except NotFoundError:
            return self._text(f"[The user attached {name}, but the file is no longer available.]")
        mime = info.mime_type

        if mime in PREVIEWABLE_IMAGE_TYPES:
            _, data = await store.read_bytes(self.user_id, attachment.id)
            return ResponseInputImageParam(
                type="input_image", detail=self.image_detail, image_url=_data_url(mime, data)
            )

        if is_text_like(mime):
            _, data = await store.read_bytes(self.user_id, attachment.id, self.text_max_bytes)
            truncated = info.size > len(data)
            text = data.decode("utf-8", "ignore" if truncated else "replace")
            note = (
                f"\n[Truncated: the first {len(data)} of {info.size} bytes are shown.]"
                if truncated
                else ""
            )
            return self._text(
                f"The user attached the file {name} ({mime}, {info.size} bytes). "
                f"Its content:\n<file name={name}>\n{text}\n</file>{note}"
            )

        if mime == "application/pdf" and self.pdf_as_file:
            _, data = await store.read_bytes(self.user_id, attachment.id)
            return ResponseInputFileParam(
                type="input_file", file_data=_data_url(mime, data), filename=attachment.name
            )

        return self._text(
            f"[The user attached the file {name} ({mime}, {info.size} bytes); "
            "its content cannot be shown to you.]"
        )
