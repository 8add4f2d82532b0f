"""A small OpenAI-compatible Chat Completions server for tests (run on loopback with uvicorn).

It records every request body and answers streamed requests word by word, so the real
``openai`` client and the Agents SDK's ``OpenAIChatCompletionsModel`` are exercised as with
Ollama or vLLM. Replies come from ``reply(body, n)``; non-streamed requests (thread titles)
from ``title``.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class FakeChatCompletions:
    def __init__(
        self,
        reply: Callable[[dict[str, Any], int], str] | None = None,
        *,
        title: str = "Fake Title",
    ) -> None:
        self.requests: list[dict[str, Any]] = []
        self.reply = reply or (lambda body, n: f"Reply number {n} from the fake server.")
        self.title = title
        self.streamed = 0
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.handle, methods=["POST"])])

    @property
    def streamed_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("stream")]

    async def handle(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        model = body.get("model", "fake")
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": "chatcmpl-title",
                    "object": "chat.completion",
                    "created": 0,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": self.title},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                }
            )
        self.streamed += 1
        text = self.reply(body, self.streamed)
        return StreamingResponse(self._chunks(model, text), media_type="text/event-stream")

    async def _chunks(self, model: str, text: str) -> AsyncIterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            payload = {
                "id": "chatcmpl-stream",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        yield chunk({"role": "assistant", "content": ""})
        for word in re.findall(r"\S+\s*", text):
            yield chunk({"content": word})
        yield chunk(
            {},
            "stop",
            usage={"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        )
        yield b"data: [DONE]\n\n"


def message_texts(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) of every message of a Chat Completions request."""
    out = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append((message["role"], content or ""))
    return out


class FakeTranscriptions:
    """``POST /v1/audio/transcriptions`` (multipart, as the ``openai`` client sends it): records
    each upload's model, file name, content type and bytes; answers ``{"text": text}``, or
    ``status`` with an OpenAI-style error body when it is not 200."""

    def __init__(self, text: str = "Transcribed words.") -> None:
        self.text = text
        self.status = 200
        self.uploads: list[dict[str, Any]] = []
        self.app = Starlette(
            routes=[Route("/v1/audio/transcriptions", self.handle, methods=["POST"])]
        )

    async def handle(self, request: Request) -> Response:
        async with request.form() as form:
            upload = form["file"]
            assert not isinstance(upload, str)
            self.uploads.append(
                {
                    "model": form["model"],
                    "filename": upload.filename,
                    "content_type": upload.content_type,
                    "data": await upload.read(),
                }
            )
        if self.status != 200:
            error = {"message": "refused by the fake", "type": "invalid_request_error"}
            return JSONResponse({"error": error}, status_code=self.status)
        return JSONResponse({"text": self.text})
