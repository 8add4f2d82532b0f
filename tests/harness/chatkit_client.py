"""A small ChatKit protocol client for tests: request builders, SSE parsing, tokens."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from fastapi import FastAPI

from app.settings import Settings

JWT_TEST_SECRET = "chatkit-pg-tests-" + "s" * 40


def token_for(user: str, settings: Settings, **claims: Any) -> str:
    assert settings.jwt_secret is not None
    now = int(time.time())
    payload = {"sub": user, "iat": now, "exp": now + 600, **claims}
    return jwt.encode(payload, settings.jwt_secret.get_secret_value(), algorithm="HS256")


def user_input(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "content": [{"type": "input_text", "text": text}],
        "attachments": [],
        "inference_options": {},
        **extra,
    }


def error_text(response: Any) -> str:
    """An error answer's body without its request id, the one random token it carries, so an
    assertion that some word is absent cannot fail (or pass) by the luck of a random id."""
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        body = {**body, "error": {k: v for k, v in error.items() if k != "request_id"}}
    return json.dumps(body)


def parse_sse(body: str) -> list[dict[str, Any]]:
    events = []
    for block in body.split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def done_items(events: list[dict[str, Any]], item_type: str | None = None) -> list[dict[str, Any]]:
    items = [e["item"] for e in of_type(events, "thread.item.done")]
    return [i for i in items if item_type is None or i["type"] == item_type]


def assistant_text(item: dict[str, Any]) -> str:
    return "".join(part["text"] for part in item["content"])


@dataclass
class ChatKitClient:
    app: FastAPI
    http: httpx.AsyncClient
    settings: Settings

    @property
    def path(self) -> str:
        return self.settings.chatkit_path

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token_for(user, self.settings)}"}

    async def post(
        self,
        payload: dict[str, Any] | bytes,
        *,
        user: str | None = "alice",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        all_headers = {"Content-Type": "application/json"}
        if user is not None:
            all_headers.update(self.auth(user))
        all_headers.update(headers or {})
        return await self.http.post(self.path, content=body, headers=all_headers)

    async def request(
        self,
        type_: str,
        params: dict[str, Any],
        *,
        user: str = "alice",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        return await self.post({"type": type_, "params": params}, user=user, headers=headers)

    async def call(self, type_: str, params: dict[str, Any], *, user: str = "alice") -> Any:
        response = await self.request(type_, params, user=user)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        return response.json()

    async def stream(
        self,
        type_: str,
        params: dict[str, Any],
        *,
        user: str = "alice",
        headers: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        response = await self.request(type_, params, user=user, headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        return parse_sse(response.text)

    async def create_thread(
        self, text: str, *, user: str = "alice"
    ) -> tuple[str, list[dict[str, Any]]]:
        events = await self.stream("threads.create", {"input": user_input(text)}, user=user)
        created = of_type(events, "thread.created")
        assert created, events
        return created[0]["thread"]["id"], events

    async def send(self, thread_id: str, text: str, *, user: str = "alice") -> list[dict[str, Any]]:
        return await self.stream(
            "threads.add_user_message",
            {"thread_id": thread_id, "input": user_input(text)},
            user=user,
        )
