"""Thread items as model input, without attachments' bytes: ``PgThreadItemConverter``.

The base every converter of the server's builds on (app.chat.converter adds the attachments'
bytes, read through app.files.store), and the note naming a message's attachments. It stands on
the ChatKit and Agents SDKs alone, so the model side (app.chat.agent, app.chat.offline_model)
imports neither the ChatKit server nor the store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agents import TResponseInputItem
from chatkit.agents import ThreadItemConverter
from chatkit.errors import CustomStreamError
from chatkit.types import AssistantMessageItem, Attachment, UserMessageTagContent
from openai.types.responses import (
    EasyInputMessageParam,
    ResponseInputContentParam,
    ResponseInputTextParam,
)

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


class PgThreadItemConverter(ThreadItemConverter):
    """Thread items to model input. Attachments are converted by ``app.chat.converter`` (which
    the lifespan hands to the server); without it they cannot be sent to the model."""

    async def attachment_to_message_content(self, attachment: Any) -> ResponseInputContentParam:
        raise CustomStreamError(
            "This server cannot send attachments to the model.", allow_retry=False
        )

    async def assistant_message_to_input(
        self, item: AssistantMessageItem
    ) -> TResponseInputItem | list[TResponseInputItem] | None:
        # The SDK's version sends ``output_text`` parts carrying ``logprobs: null``, which the
        # Agents SDK's Chat Completions converter rejects; plain text works for every provider.
        text = "".join(part.text for part in item.content)
        return EasyInputMessageParam(type="message", role="assistant", content=text)

    async def tag_to_message_content(self, tag: UserMessageTagContent) -> ResponseInputContentParam:
        data = json.dumps(tag.data, ensure_ascii=False, default=str)[:2000]
        return ResponseInputTextParam(
            type="input_text", text=f"@{tag.text} (id {tag.id}) refers to: {data}"
        )
