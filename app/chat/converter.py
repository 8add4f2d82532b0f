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

Within a reply the bytes follow ``app.chat.model_files``: at most ``MODEL_INPUT_FILE_BYTES`` per
model request, newest files first (older ones become a note saying they were omitted), each
file once per request, read once per reply and dropped when it ends.

Every user message with attachments also gets a note naming them (``attachments_note``), so a
model knows what the user attached even when a part carries no name (an image), and the
offline demo model can acknowledge them (``attachment_names``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agents import TResponseInputItem
from chatkit.store import NotFoundError
from chatkit.types import Attachment, ThreadItem, UserMessageItem
from openai.types.responses import (
    ResponseInputContentParam,
    ResponseInputFileParam,
    ResponseInputImageParam,
)

from app.chat.model_files import (
    ImageDetail,
    ReplyFiles,
    describe_note,
    file_kind,
    read_data_url,
    read_text,
    text_part,
    unavailable_note,
    unique_attachments,
)
from app.chat.server import PgThreadItemConverter
from app.errors import MissingUserError
from app.files.store import PgAttachmentStore

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


class AttachmentConverter(PgThreadItemConverter):
    """Attachments as model input, one converter per reply (``for_user``).

    ``to_agent_input`` plans the files of the whole history first (``app.chat.model_files``): each
    attachment becomes a marker, resolved to its bytes just before each model call, or a note
    (omitted for the budget, shown in a newer message, gone, or a type the model cannot
    read). ``files`` is that plan, for the server to resolve and release."""

    def __init__(
        self,
        attachments: PgAttachmentStore,
        user_id: str | None = None,
        *,
        text_max_bytes: int | None = None,
        pdf_as_file: bool = True,
        image_detail: ImageDetail = "auto",
        file_budget: int | None = None,
    ) -> None:
        self.attachments = attachments
        self.user_id = user_id
        settings = attachments.settings
        self.text_max_bytes = text_max_bytes or settings.attachment_text_max_bytes
        self.pdf_as_file = pdf_as_file
        self.image_detail: ImageDetail = image_detail
        self.file_budget = settings.model_input_file_bytes if file_budget is None else file_budget
        self.files: ReplyFiles | None = None
        self._message_id: str | None = None

    def for_user(self, user_id: str) -> AttachmentConverter:
        """The same converter, reading files as ``user_id``."""
        return AttachmentConverter(
            self.attachments,
            user_id,
            text_max_bytes=self.text_max_bytes,
            pdf_as_file=self.pdf_as_file,
            image_detail=self.image_detail,
            file_budget=self.file_budget,
        )

    def _user(self) -> str:
        if self.user_id is None:
            raise MissingUserError("AttachmentConverter used without a user: call for_user()")
        return self.user_id

    async def to_agent_input(
        self, thread_items: Sequence[ThreadItem] | ThreadItem
    ) -> list[TResponseInputItem]:
        items = list(thread_items) if isinstance(thread_items, Sequence) else [thread_items]
        self.files = ReplyFiles(
            self.attachments,
            self._user(),
            budget=self.file_budget,
            text_max_bytes=self.text_max_bytes,
            pdf_as_file=self.pdf_as_file,
            image_detail=self.image_detail,
        )
        await self.files.plan(items)
        return await super().to_agent_input(items)

    async def user_message_to_input(
        self, item: UserMessageItem, is_last_message: bool = True
    ) -> TResponseInputItem | list[TResponseInputItem] | None:
        unique = unique_attachments(item.attachments)
        if len(unique) != len(item.attachments):  # stored before duplicates were collapsed
            item = item.model_copy(update={"attachments": unique})
        self._message_id = item.id
        try:
            converted = await super().user_message_to_input(item, is_last_message)
        finally:
            self._message_id = None
        if not item.attachments or not isinstance(converted, list) or not converted:
            return converted
        message: Any = converted[0]
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            # right after the typed text, before the attachments themselves
            content.insert(1, text_part(attachments_note(item.attachments)))
        return converted

    async def attachment_to_message_content(
        self, attachment: Attachment
    ) -> ResponseInputContentParam:
        user_id = self._user()
        files = self.files
        if files is not None and self._message_id is not None:
            place = files.placement(self._message_id, attachment.id)
            if place is not None:
                return files.part(place, attachment)
        # Called on its own (not from a planned history): the content itself, now.
        store = self.attachments
        try:
            info = await store.file_info(user_id, attachment.id)
        except NotFoundError:
            return text_part(unavailable_note(attachment.name))
        kind = file_kind(info, pdf_as_file=self.pdf_as_file)
        if kind == "text":
            return text_part(
                await read_text(store, user_id, info, attachment.name, self.text_max_bytes)
            )
        data_url = await read_data_url(store, user_id, info) if kind != "other" else None
        if kind == "image" and data_url is not None:
            return ResponseInputImageParam(
                type="input_image", detail=self.image_detail, image_url=data_url
            )
        if kind == "pdf" and data_url is not None:
            return ResponseInputFileParam(
                type="input_file", file_data=data_url, filename=attachment.name
            )
        if kind == "other":
            return text_part(describe_note(info, attachment.name))
        return text_part(unavailable_note(attachment.name))
