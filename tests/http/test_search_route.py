"""``GET {CHATKIT_PATH}/threads/search`` (app.http.search) through the whole app: threads made
over the ChatKit protocol are found by their owner only, the route authenticates and spends the
user's rate budget like the other JSON routes, and every bad input is a 400 JSON answer naming
its field, never an exception's text."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import pytest

from app.pg.search import MAX_LIMIT, MAX_QUERY_CHARS, Cursor
from tests.conftest import MakeClient
from tests.harness.chatkit_client import ChatKitClient

LEAKS = ("Traceback", "asyncpg", "tsquery", "syntax error", "Exception", "psql", "SELECT")


async def search(
    client: ChatKitClient, query: str, *, user: str | None = "alice"
) -> httpx.Response:
    headers = client.auth(user) if user is not None else {}
    return await client.http.get(f"{client.path}/threads/search?{query}", headers=headers)


def q(text: str, **extra: Any) -> str:
    params = [
        f"q={quote(text, safe='')}",
        *(f"{k}={quote(str(v), safe='')}" for k, v in extra.items()),
    ]
    return "&".join(params)


def assert_400(response: httpx.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["field"] == field
    assert not any(leak in error["message"] for leak in LEAKS), error


@pytest.fixture
async def client(make_client: MakeClient) -> ChatKitClient:
    return await make_client()


async def test_a_users_threads_are_found_and_only_theirs(client: ChatKitClient) -> None:
    mine, events = await client.create_thread("the quokka smiles at dawn")
    theirs, _ = await client.create_thread("the quokka smiles at dawn", user="bob")
    user_item = next(
        e["item"]["id"]
        for e in events
        if e["type"] == "thread.item.done" and e["item"]["type"] == "user_message"
    )
    response = await search(client, q("quokka"))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert {h["thread_id"] for h in body["data"]} == {mine}
    hit = next(h for h in body["data"] if h["item_id"] == user_item)
    assert [s["text"] for s in hit["snippet"] if s["hit"]] == ["quokka"]
    assert "".join(s["text"] for s in hit["snippet"]) == "the quokka smiles at dawn"
    # The title derived from the first message ("first_message" titles) matches too.
    assert any(h["item_id"] is None for h in body["data"])
    assert body["after"] is None
    bobs = (await search(client, q("quok"), user="bob")).json()["data"]
    assert {h["thread_id"] for h in bobs} == {theirs}
    assert (await search(client, q("quokka"), user="carol")).json() == {
        "data": [],
        "after": None,
    }


async def test_pages_follow_the_cursor(client: ChatKitClient) -> None:
    for n in range(3):
        await client.create_thread(f"numbat number {n}")
    seen: list[tuple[str, str | None]] = []
    after: str | None = None
    for _ in range(10):
        extra = {"limit": 2, **({"after": after} if after else {})}
        body = (await search(client, q("numbat", **extra))).json()
        seen += [(h["thread_id"], h["item_id"]) for h in body["data"]]
        after = body["after"]
        if after is None:
            break
    assert len(seen) == len(set(seen)) == 6  # 3 titles, 3 user messages


async def test_the_route_needs_a_valid_token(client: ChatKitClient) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
        response = await client.http.get(f"{client.path}/threads/search?q=a", headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"]
    response = await client.http.post(
        f"{client.path}/threads/search?q=a", headers=client.auth("alice")
    )
    assert response.status_code == 405


async def test_searches_spend_the_users_request_budget(make_client: MakeClient) -> None:
    client = await make_client(rate_limit_per_minute=3)
    statuses = [(await search(client, q("anything"))).status_code for _ in range(5)]
    assert statuses[:3] == [200, 200, 200]
    assert statuses[3:] == [429, 429]
    refused = await search(client, q("anything"))
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    # Another user's budget is their own.
    assert (await search(client, q("anything"), user="bob")).status_code == 200


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("", "q"),
        ("q=", "q"),
        ("q=%20%20", "q"),
        ("limit=5", "q"),
        (q("x" * (MAX_QUERY_CHARS + 1)), "q"),
        (q("y" * 60_000), "q"),
        ("q=a%00b", "q"),
        (q("a", limit=0), "limit"),
        (q("a", limit=MAX_LIMIT + 1), "limit"),
        (q("a", limit=-1), "limit"),
        (q("a", limit="ten"), "limit"),
        (q("a", limit="1e2"), "limit"),
        (q("a", limit="٣"), "limit"),  # an Arabic-Indic digit
        (q("a", limit=""), "limit"),
        (q("a", after=""), "after"),
        (q("a", after="garbage!"), "after"),
        (q("a", after=Cursor(1.0, 1, 1).encode()[:-2]), "after"),
        (q("a", after="A" * 10_000), "after"),
    ],
)
async def test_bad_input_is_a_400_naming_its_field(
    client: ChatKitClient, query: str, field: str
) -> None:
    assert_400(await search(client, query), field)


@pytest.mark.parametrize(
    "text",
    [
        "&",
        "|",
        "!",
        "(((",
        "'",
        '"',
        "\\",
        "a:*",
        "<->",
        "<2>",
        "'x' & !'y'",
        "-",
        "or or",
        "🦘",
        "DROP TABLE chatkit_items;--",
        "%",
        "_",
        "日本語",
        "ﷺ",
        "x" * MAX_QUERY_CHARS,
    ],
)
async def test_query_syntax_in_the_text_is_only_text(client: ChatKitClient, text: str) -> None:
    response = await search(client, q(text))
    assert response.status_code == 200, response.text
    assert response.json()["data"] == []
