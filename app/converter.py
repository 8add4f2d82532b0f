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
"""

from __future__ import annotations

import base64
from typing import Literal

from chatkit.agents import ThreadItemConverter
from chatkit.store import NotFoundError
from chatkit.types import Attachment
from openai.types.responses import (
    ResponseInputContentParam,
    ResponseInputFileParam,
    ResponseInputImageParam,
    ResponseInputTextParam,
)

from .attachments import PREVIEWABLE_IMAGE_TYPES, PgAttachmentStore, is_text_like
from .errors import MissingUserError


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _quote(name: str) -> str:
    return '"' + name.replace('"', "'").replace("\n", " ") + '"'


class AttachmentConverter(ThreadItemConverter):
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
