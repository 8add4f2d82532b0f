"""Thread titles after the first exchange: asked of the model, or derived from the message."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from agents import Agent, RunConfig, Runner
from chatkit.types import UserMessageItem, UserMessageTagContent, UserMessageTextContent

from app.sanitize import clean

log = logging.getLogger(__name__)

MAX_TITLE_CHARS = 80
DERIVED_TITLE_CHARS = 60
_MODEL_INPUT_CHARS = 2000


def user_text(message: UserMessageItem) -> str:
    parts: list[str] = []
    for part in message.content:
        if isinstance(part, UserMessageTextContent):
            parts.append(part.text)
        elif isinstance(part, UserMessageTagContent):
            parts.append(f"@{part.text}")
    return "".join(parts)


def derive_title(text: str) -> str | None:
    """The message itself, whitespace collapsed and cut at a word near 60 characters."""
    words = " ".join(clean(text).split())
    if not words:
        return None
    if len(words) <= DERIVED_TITLE_CHARS:
        return words
    cut = words[:DERIVED_TITLE_CHARS]
    space = cut.rfind(" ")
    if space > DERIVED_TITLE_CHARS // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:.-") + "…"


def tidy_model_title(raw: str) -> str | None:
    """First line of the model's answer without quotes, Markdown or a final period."""
    lines = [line for line in clean(raw).splitlines() if line.strip()]
    if not lines:
        return None
    title = re.sub(r"^(title\s*:\s*)", "", lines[0].strip(), flags=re.IGNORECASE)
    title = title.strip().strip("\"'`*#\u201c\u201d\u2018\u2019 ").rstrip(".").strip()
    title = " ".join(title.split())
    if not title:
        return None
    return title if len(title) <= MAX_TITLE_CHARS else title[: MAX_TITLE_CHARS - 1] + "…"


async def make_title(
    message: UserMessageItem,
    *,
    title_agent: Agent[Any] | None,
    run_config: RunConfig,
    time_limit: float,
) -> str | None:
    text = user_text(message)
    if title_agent is not None and text.strip():
        try:
            async with asyncio.timeout(time_limit):
                result = await Runner.run(
                    title_agent, text[:_MODEL_INPUT_CHARS], max_turns=1, run_config=run_config
                )
            title = tidy_model_title(str(result.final_output or ""))
            if title:
                return title
        except Exception as exc:
            log.warning(
                "the model gave no title; deriving one from the message",
                extra={"reason": type(exc).__name__},
            )
    return derive_title(text)
