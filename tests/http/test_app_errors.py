"""Bad input is a clear 4xx JSON answer, never a 500, and never echoes what was sent;
our own failures are a generic 500 whose details only reach the log."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.observability import JsonFormatter
from app.pg.store import PostgresStore
from tests.conftest import MakeClient
from tests.harness.chatkit_client import error_text, user_input

ALICE = {"user_id": "alice"}


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["request_id"] == response.headers["x-request-id"]
    return error


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"type": "threads.list", ', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe garbage", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"params": {}}', "has no type"),
        (b'{"type": "threads.explode_everything", "params": {}}', "Unknown request type"),
        (b'{"type": 42, "params": {}}', "Unknown request type"),
        (b'{"type": "threads.update", "params": {"thread_id": "t"}}', "Invalid request"),
        (b'{"type": "threads.list", "params": {"limit": "many"}}', "Invalid request"),
    ],
)
async def test_malformed_requests_are_400(
    make_client: MakeClient, body: bytes, message: str
) -> None:
    client = await make_client()
    response = await client.post(body)
    error = _error(response, 400)
    assert error["code"] == "invalid_request"
    assert message in error["message"]
    text = error_text(response)
    assert "explode" not in text and "many" not in text


async def test_validation_error_names_the_field_not_the_value(make_client: MakeClient) -> None:
    client = await make_client()
    error = _error(
        await client.post(b'{"type": "threads.update", "params": {"thread_id": "t"}}'), 400
    )
    assert error["field"] == "threads.update.params.title"
    evil = {
        "type": "threads.add_structured_input",
        "params": {
            "thread_id": "thr_x",
            "item_id": "msg_x",
            "input": {"answers": {"<img src=x onerror=alert(1)>": {"values": 5}}},
        },
    }
    response = await client.post(json.dumps(evil).encode())
    error = _error(response, 400)
    text = error_text(response)
    assert "onerror" not in text and "img" not in text
    assert error["field"] == "threads.add_structured_input.params.input.answers.*.values"


async def test_body_limit_is_413(make_client: MakeClient) -> None:
    client = await make_client(max_body_bytes=4096)
    big = json.dumps({"type": "threads.create", "params": {"input": user_input("x" * 5000)}})
    # Declared length over the limit.
    error = _error(await client.post(big.encode()), 413)
    assert error["code"] == "payload_too_large"

    # No Content-Length (chunked): counted while reading.
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000].encode()

    response = await client.http.post(
        client.path,
        content=chunks(),
        headers={**client.auth("alice"), "Content-Type": "application/json"},
    )
    assert "content-length" not in response.request.headers
    _error(response, 413)
    # Just under the limit is fine.
    ok = json.dumps({"type": "threads.list", "params": {"limit": 5}, "metadata": {"p": "y" * 3900}})
    assert len(ok) < 4096
    assert (await client.post(ok.encode())).status_code == 200


async def test_authentication_comes_before_the_body(make_client: MakeClient) -> None:
    client = await make_client(max_body_bytes=4096)
    response = await client.post(b"x" * 10_000, user=None)
    error = _error(response, 401)
    assert error["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("text", ["nul \u0000 inside", "lone \ud800 surrogate"])
async def test_unstorable_text_is_400_and_stores_nothing(
    make_client: MakeClient, store: PostgresStore, text: str
) -> None:
    client = await make_client()
    response = await client.request("threads.create", {"input": user_input(text)})
    error = _error(response, 400)
    # A lone surrogate escape is refused by the JSON parser itself; NUL by our check.
    assert "NUL" in error["message"] or "not valid JSON" in error["message"]
    assert (await store.load_threads(10, None, "desc", ALICE)).data == []

    thread_id, _ = await client.create_thread("fine")
    for type_, params in [
        ("threads.update", {"thread_id": thread_id, "title": text}),
        ("threads.add_user_message", {"thread_id": thread_id, "input": user_input(text)}),
        ("threads.list", {"limit": 3}),  # the bad text is in the metadata here
    ]:
        body = {"type": type_, "params": params, "metadata": {"k": text}}
        _error(await client.post(json.dumps(body).encode()), 400)
    assert (await store.load_thread(thread_id, ALICE)).title == "fine"
    items = (await store.load_thread_items(thread_id, None, 10, "asc", ALICE)).data
    assert len(items) == 2


async def test_bad_paging_values_are_400(make_client: MakeClient) -> None:
    client = await make_client()
    for params in ({"limit": -5}, {"order": "sideways"}, {"after": 12}):
        _error(await client.request("threads.list", params), 400)


async def test_unknown_routes_and_methods_are_json(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.http.get("/nope")
    assert _error(response, 404)["code"] == "not_found"
    response = await client.http.get(client.path)
    assert _error(response, 405)["code"] == "method_not_allowed"


class BrokenStore(PostgresStore):
    async def load_threads(self, limit: int, after: str | None, order: str, context: Any) -> Any:
        raise RuntimeError("secret-detail-xyz from the database layer")


async def test_internal_errors_are_generic(
    make_client: MakeClient, store: PostgresStore, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(app_store=BrokenStore(store.pool))
    caplog.set_level(logging.INFO)
    response = await client.request("threads.list", {})
    error = _error(response, 500)
    assert error == {
        "code": "internal_error",
        "message": "Internal server error.",
        "request_id": response.headers["x-request-id"],
    }
    assert "secret-detail" not in error_text(response)
    # The details are in the log, under the request id.
    records = [r for r in caplog.records if r.exc_info and "secret-detail" in str(r.exc_info[1])]
    assert records
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == response.headers["x-request-id"]
    assert line["user_id"] == "alice" and line["op"] == "threads.list"
    assert "secret-detail" in line["exc"]
