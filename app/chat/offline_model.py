"""The built-in offline model: with no provider configured, the stack still runs end to end.

It streams a short, honest demo reply word by word in the OpenAI Responses event format, so
the rest of the server (the Agents SDK runner, ChatKit's converter, the store) is exercised
exactly as with a real model. ``text_response_events`` is also what tests and benchmarks use
to script long streamed replies.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, cast

from agents import Model, ModelResponse, ModelSettings, ModelTracing, Tool, Usage
from agents.agent_output import AgentOutputSchemaBase
from agents.handoffs import Handoff
from agents.items import TResponseInputItem, TResponseStreamEvent
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from openai.types.responses.response_prompt_param import ResponsePromptParam

from app.chat.converter import attachment_names
from app.ids import new_id

OFFLINE_MODEL_NAME = "offline-demo"


def _message(item_id: str, text: str, status: str) -> ResponseOutputMessage:
    content = [ResponseOutputText(type="output_text", text=text, annotations=[], logprobs=[])]
    return ResponseOutputMessage(
        id=item_id,
        type="message",
        role="assistant",
        status=status,
        content=content if status == "completed" else [],
    )


def _response(response_id: str, output: list[Any], status: str) -> Response:
    return Response(
        id=response_id,
        created_at=0,
        model=OFFLINE_MODEL_NAME,
        object="response",
        output=output,
        tool_choice="auto",
        tools=[],
        parallel_tool_calls=False,
        status=status,
    )


def text_response_events(
    chunks: Iterable[str], *, item_id: str, response_id: str = "resp_offline"
) -> Iterator[TResponseStreamEvent]:
    """The Responses stream of one assistant message whose text arrives as ``chunks``."""
    seq = 0

    def n() -> int:
        nonlocal seq
        seq += 1
        return seq - 1

    yield cast(
        TResponseStreamEvent,
        ResponseCreatedEvent(
            type="response.created",
            response=_response(response_id, [], "in_progress"),
            sequence_number=n(),
        ),
    )
    yield cast(
        TResponseStreamEvent,
        ResponseOutputItemAddedEvent(
            type="response.output_item.added",
            item=_message(item_id, "", "in_progress"),
            output_index=0,
            sequence_number=n(),
        ),
    )
    empty = ResponseOutputText(type="output_text", text="", annotations=[], logprobs=[])
    yield cast(
        TResponseStreamEvent,
        ResponseContentPartAddedEvent(
            type="response.content_part.added",
            item_id=item_id,
            output_index=0,
            content_index=0,
            part=empty,
            sequence_number=n(),
        ),
    )
    parts: list[str] = []
    for chunk in chunks:
        parts.append(chunk)
        yield cast(
            TResponseStreamEvent,
            ResponseTextDeltaEvent(
                type="response.output_text.delta",
                item_id=item_id,
                output_index=0,
                content_index=0,
                delta=chunk,
                logprobs=[],
                sequence_number=n(),
            ),
        )
    text = "".join(parts)
    final = ResponseOutputText(type="output_text", text=text, annotations=[], logprobs=[])
    yield cast(
        TResponseStreamEvent,
        ResponseTextDoneEvent(
            type="response.output_text.done",
            item_id=item_id,
            output_index=0,
            content_index=0,
            text=text,
            logprobs=[],
            sequence_number=n(),
        ),
    )
    yield cast(
        TResponseStreamEvent,
        ResponseContentPartDoneEvent(
            type="response.content_part.done",
            item_id=item_id,
            output_index=0,
            content_index=0,
            part=final,
            sequence_number=n(),
        ),
    )
    message = _message(item_id, text, "completed")
    yield cast(
        TResponseStreamEvent,
        ResponseOutputItemDoneEvent(
            type="response.output_item.done", item=message, output_index=0, sequence_number=n()
        ),
    )
    yield cast(
        TResponseStreamEvent,
        ResponseCompletedEvent(
            type="response.completed",
            response=_response(response_id, [message], "completed"),
            sequence_number=n(),
        ),
    )


def _last_user_text(input: str | list[TResponseInputItem]) -> str:
    if isinstance(input, str):
        return input
    for item in reversed(input):
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                # The first text part is what the user typed; later ones are attachments
                # (app.chat.converter: the note naming them, the content of text files).
                texts = [
                    str(p.get("text", ""))
                    for p in content
                    if isinstance(p, dict) and p.get("type") == "input_text"
                ]
                text = texts[0] if texts else ""
                # Skip the hidden-context notes the SDK adds as user messages.
                if text and not text.startswith("Hidden context for the agent"):
                    return text
    return ""


def demo_reply(input: str | list[TResponseInputItem]) -> str:
    words = len(_last_user_text(input).split())
    names = attachment_names(input)
    attached = (
        f"You attached {', '.join(json.dumps(n, ensure_ascii=False) for n in names)}: "
        "they are stored in PostgreSQL and a real model would receive them. "
        if names
        else ""
    )
    return (
        "Hello! This is chatkit-pg's offline demo model, not a real language model, so this "
        f"canned reply is all I can say (your message had {words} "
        f"word{'' if words == 1 else 's'}). "
        f"{attached}"
        "Your conversation is stored in PostgreSQL all the same. To get real answers, set "
        "OPENAI_API_KEY (and optionally MODEL_NAME) for OpenAI, or OPENAI_BASE_URL and "
        "MODEL_NAME for any OpenAI-compatible server such as Ollama, vLLM or LiteLLM, and "
        "restart the server."
    )


def words_of(text: str) -> list[str]:
    """Split keeping the whitespace, so the chunks join back to ``text`` exactly."""
    return re.findall(r"\S+\s*", text)


class OfflineModel(Model):
    """An ``agents.Model`` that needs no network: it explains how to configure a real one."""

    def __init__(self, *, word_delay: float = 0.03) -> None:
        self.word_delay = word_delay

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        message = _message(new_id("message"), demo_reply(input), "completed")
        return ModelResponse(output=[message], usage=Usage(), response_id=None)

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        chunks = words_of(demo_reply(input))
        if model_settings.max_tokens is not None:
            # Like a real model at its output limit: the reply stops short (a word per token).
            chunks = chunks[: max(model_settings.max_tokens, 1)]
        for event in text_response_events(chunks, item_id=new_id("message")):
            if event.type == "response.output_text.delta" and self.word_delay > 0:
                await asyncio.sleep(self.word_delay)
            yield event
