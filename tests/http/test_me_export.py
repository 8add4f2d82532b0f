"""``GET /me/export`` (app.http.me) through the app: the signed-in user's archive, never anyone
else's; Bearer authentication as for every route; one request of the rate limit; streamed (the
first bytes leave before the archive is finished, one export per user at a time); the example
task plugin's rows included; wrong methods and missing tokens answered as JSON errors."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from app.files.store import CHUNK_SIZE
from tests.conftest import MakeClient
from tests.harness.chatkit_client import ChatKitClient, token_for
from tests.harness.userdata import (
    TASKS_PLUGIN,
    assert_empty,
    assert_matches,
    read_archive,
    seed_user,
)

PATH = "/me/export"


async def client_for(make_client: MakeClient, tasks_db: str, **overrides: Any) -> ChatKitClient:
    return await make_client(database_url=tasks_db, chatkit_plugins=[TASKS_PLUGIN], **overrides)


async def test_each_user_gets_their_own_archive(
    make_client: MakeClient, tasks_db: str, tasks_owner: asyncpg.Connection
) -> None:
    alice = await seed_user(tasks_owner, "alice")
    bob = await seed_user(tasks_owner, "bob", threads=1, file_sizes=(3,), tasks=("bob's",))
    client = await client_for(make_client, tasks_db)
    for seeded in (alice, bob):
        response = await client.http.get(PATH, headers=client.auth(seeded.user_id))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/zip"
        assert response.headers["content-disposition"].startswith("attachment;")
        assert response.headers["cache-control"] == "no-store"
        assert "content-length" not in response.headers  # streamed, not assembled first
        assert_matches(read_archive(response.content), seeded)

    nobody = await client.http.get(PATH, headers=client.auth("nobody"))
    assert nobody.status_code == 200
    assert_empty(read_archive(nobody.content), "nobody")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic YTpi"}],
)
async def test_without_a_valid_token_it_is_401_json(
    make_client: MakeClient, tasks_db: str, tasks_owner: asyncpg.Connection, headers: dict[str, str]
) -> None:
    await seed_user(tasks_owner, "alice")
    client = await client_for(make_client, tasks_db)
    response = await client.http.get(PATH, headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"]
    assert b"PK" not in response.content


async def test_other_methods_are_405_json(make_client: MakeClient, tasks_db: str) -> None:
    client = await client_for(make_client, tasks_db)
    response = await client.http.post(PATH, headers=client.auth("alice"))
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_it_counts_against_the_rate_limit(
    make_client: MakeClient, tasks_db: str, tasks_owner: asyncpg.Connection
) -> None:
    client = await client_for(make_client, tasks_db, rate_limit_per_minute=2)
    statuses = [
        (await client.http.get(PATH, headers=client.auth("alice"))).status_code for _ in range(3)
    ]
    assert statuses == [200, 200, 429]
    refused = await client.http.get(PATH, headers=client.auth("alice"))
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    # another user's budget is their own
    assert (await client.http.get(PATH, headers=client.auth("bob"))).status_code == 200


async def test_streamed_and_one_export_per_user_at_a_time(
    make_client: MakeClient, tasks_db: str, tasks_owner: asyncpg.Connection
) -> None:
    """The first export is held after its first body piece (its reader is slow): the bytes
    left before the archive was finished, and a second export of the same user is a 429 until
    the first ends; another user's is not held up."""
    alice = await seed_user(tasks_owner, "alice", file_sizes=(4 * CHUNK_SIZE,))
    await seed_user(tasks_owner, "bob", threads=1, file_sizes=())
    client = await client_for(make_client, tasks_db)
    token = token_for("alice", client.settings)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    first_piece = asyncio.Event()
    go_on = asyncio.Event()
    body = bytearray()
    status: list[int] = []

    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays until the response has ended
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))
            if not first_piece.is_set():
                first_piece.set()
                await go_on.wait()

    held = asyncio.create_task(client.app(scope, receive, send))
    try:
        await asyncio.wait_for(first_piece.wait(), 60)
        assert status == [200] and len(body) > 0
        second = await client.http.get(PATH, headers=client.auth("alice"))
        assert second.status_code == 429
        assert second.json()["error"]["message"] == "An export of your data is already running."
        assert (await client.http.get(PATH, headers=client.auth("bob"))).status_code == 200
    finally:
        go_on.set()
        await asyncio.wait_for(held, 60)
    assert_matches(read_archive(bytes(body)), alice)
    again = await client.http.get(PATH, headers=client.auth("alice"))
    assert again.status_code == 200
