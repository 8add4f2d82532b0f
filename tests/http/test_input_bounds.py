"""Client input that once reached PostgreSQL or ``int()`` unchecked (issue 19, items 2, 7c, 7d),
each as a 4xx JSON answer over real HTTP (uvicorn on loopback, the real app and database):

* signed-URL fields parsed strictly: an expiry that is not ASCII digits (``²`` passes
  ``str.isdigit()``) or longer than any real one, a signature or user of any shape;
* every id a request names bounded in length before SQL (a few KB of random text in a feedback
  item id overflowed the primary key's B-tree entry);
* ``limit`` a JSON integer from 1 to the page cap (no ``0``, ``true``, ``"10"``, ``3.0``);
* no ``Host`` copied into a redirect (no trailing-slash redirect at all).

The fuzzing of every request type is tests/test_hostile_fields.py; the plugin's range-checked
ids are in tests/chat/test_plugins.py."""

from __future__ import annotations

import random
import string
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from app.ids import ID_FIELDS, MAX_ID_CHARS
from app.pg.store import MAX_PAGE_SIZE
from tests.conftest import MakeClient
from tests.files.test_attachments import png
from tests.harness.chatkit_client import ChatKitClient, done_items, user_input
from tests.harness.hostile_fuzz import EACH, field_paths, request_models
from tests.harness.loopback import serve


@pytest.fixture
async def live(make_client: MakeClient) -> AsyncIterator[tuple[ChatKitClient, httpx.AsyncClient]]:
    """A started app (its ASGI client, for setup) and the same app served by uvicorn."""
    ck = await make_client(public_base_url="http://testserver")
    async with (
        serve(ck.app, lifespan="off") as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        yield ck, http


def assert_json_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["request_id"] == response.headers["x-request-id"]


def random_text(n: int, seed: int) -> str:
    """Incompressible text: repetitive text compresses under PostgreSQL's B-tree size limit."""
    rng = random.Random(seed)
    return "".join(rng.choices(string.ascii_letters + string.digits + "ßø€𝄞", k=n))


# --- signed URLs -------------------------------------------------------------------------------

BAD_EXPIRIES = ["²", "1²", "١٢٣", "9" * 5000, "9" * 20, " 1", "+1", "1_0", "-1", "0x10", ""]


async def test_signed_urls_refuse_any_expiry_that_is_not_a_short_ascii_number(
    live: tuple[ChatKitClient, httpx.AsyncClient],
) -> None:
    ck, http = live
    image = png(4, 4)
    created = await ck.call(
        "attachments.create", {"name": "a.png", "size": len(image), "mime_type": "image/png"}
    )
    upload = urlsplit(created["upload_descriptor"]["url"])
    preview = urlsplit(created["preview_url"])
    for url in (upload, preview):
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        for expiry in BAD_EXPIRIES:
            params = {**query, "e": expiry}
            if url is upload:
                for method in ("POST", "PUT"):
                    r = await http.request(method, url.path, params=params, content=image)
                    assert_json_error(r, 403, "invalid_signature")
            else:
                assert_json_error(await http.get(url.path, params=params), 403, "invalid_signature")
        for field, value in (("s", "é" * 43), ("s", "A" * 5000), ("u", "x" * 5000), ("u", "")):
            r = await http.get(preview.path, params={**query, field: value})
            assert_json_error(r, 403, "invalid_signature")
    # the real URLs still work
    r = await http.post(upload.path + "?" + upload.query, content=image)
    assert r.status_code == 200, r.text
    r = await http.get(preview.path + "?" + preview.query)
    assert r.status_code == 200 and r.content == image


@pytest.mark.parametrize("declared", ["²", "9" * 5000, "-1", "1_0", " 4", "0x10"])
async def test_a_malformed_content_length_is_400(make_client: MakeClient, declared: str) -> None:
    # Over ASGI: uvicorn's parser refuses such a header itself, but the app must not rely on a
    # server in front of it (another ASGI server, a test client) for that.
    ck = await make_client()
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nhi\r\n--b--'
    )
    for path in ("/files", ck.path):
        headers = {
            **ck.auth("alice"),
            "Content-Type": "multipart/form-data; boundary=b",
            "Content-Length": declared.encode("latin-1"),  # as a server decodes it
        }
        response = await ck.http.post(path, content=body, headers=headers)
        assert_json_error(response, 400, "invalid_request")


async def test_a_multipart_boundary_the_parser_refuses_is_400(
    live: tuple[ChatKitClient, httpx.AsyncClient],
) -> None:
    """Found by the fuzzer: a boundary longer than python-multipart takes (256; RFC 2046
    allows 70) made its constructor raise, a 500."""
    ck, http = live
    for boundary in ("b" * 257, "9" * 5000):
        body = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"'
        body += f"\r\n\r\nhi\r\n--{boundary}--\r\n"
        headers = {**ck.auth("alice"), "Content-Type": f"multipart/form-data; boundary={boundary}"}
        response = await http.post("/files", content=body.encode(), headers=headers)
        assert_json_error(response, 400, "invalid_request")
    ok = {**ck.auth("alice"), "Content-Type": "multipart/form-data; boundary=" + "b" * 70}
    body = f'--{"b" * 70}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"'
    body += f"\r\nContent-Type: text/plain\r\n\r\nhi\r\n--{'b' * 70}--\r\n"
    response = await http.post("/files", content=body.encode(), headers=ok)
    assert response.status_code == 200, response.text


# --- ids ---------------------------------------------------------------------------------------


async def test_feedback_ids_of_random_kilobytes_are_400_not_500(
    make_client: MakeClient,
) -> None:
    ck = await make_client()
    thread_id, events = await ck.create_thread("hello")
    [reply] = done_items(events, "assistant_message")
    long_id = random_text(3000, 1)
    for params in (
        {"thread_id": thread_id, "item_ids": [long_id], "kind": "positive"},
        {"thread_id": thread_id, "item_ids": [reply["id"], long_id], "kind": "negative"},
        {"thread_id": long_id, "item_ids": [reply["id"]], "kind": "positive"},
    ):
        r = await ck.request("items.feedback", params)
        assert_json_error(r, 400, "invalid_request")
        assert "at most" in r.json()["error"]["message"]
    ok = {"thread_id": thread_id, "item_ids": [reply["id"]], "kind": "positive"}
    assert (await ck.request("items.feedback", ok)).status_code == 200


def test_every_id_field_of_the_protocol_is_checked() -> None:
    """A field of any request that names a stored object is in ``app.ids.ID_FIELDS`` (so an
    SDK release adding one fails here until it is bounded too)."""
    names = set()
    for model in request_models():
        for path in field_paths(model):
            leaf = [p for p in path if p != EACH][-1]
            if leaf.endswith(("_id", "_ids")) or leaf in ("after", "before", "attachments"):
                names.add(leaf)
    assert len(request_models()) >= 16
    assert names == ID_FIELDS


ID_CASES: list[tuple[str, dict[str, Any]]] = [
    ("threads.get_by_id", {"thread_id": "{id}"}),
    ("threads.update", {"thread_id": "{id}", "title": "t"}),
    ("threads.delete", {"thread_id": "{id}"}),
    ("threads.list", {"after": "{id}"}),
    ("items.list", {"thread_id": "{id}"}),
    ("items.list", {"thread_id": "{thread}", "after": "{id}"}),
    ("items.feedback", {"thread_id": "{thread}", "item_ids": ["{id}"], "kind": "positive"}),
    ("threads.retry_after_item", {"thread_id": "{thread}", "item_id": "{id}"}),
    ("threads.add_user_message", {"thread_id": "{id}", "input": user_input("x")}),
    ("threads.add_user_message", {"thread_id": "{thread}", "input": user_input("x")}),
    ("threads.create", {"input": user_input("x")}),
    ("threads.add_client_tool_output", {"thread_id": "{id}", "result": {}}),
    (
        "threads.add_structured_input",
        {"thread_id": "{thread}", "item_id": "{id}", "input": {"answers": {}}},
    ),
    (
        "threads.custom_action",
        {"thread_id": "{thread}", "item_id": "{id}", "action": {"type": "x"}},
    ),
    (
        "threads.sync_custom_action",
        {"thread_id": "{id}", "item_id": "{thread}", "action": {"type": "x"}},
    ),
    ("attachments.delete", {"attachment_id": "{id}"}),
]


def fill(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str) and value in ("{id}", "{thread}"):
        return ids[value]
    if isinstance(value, dict):
        return {k: fill(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, ids) for v in value]
    return value


@pytest.mark.parametrize(
    "type_, params", ID_CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(ID_CASES)]
)
async def test_every_id_field_is_bounded_before_sql(
    make_client: MakeClient, type_: str, params: dict[str, Any]
) -> None:
    ck = await make_client()
    thread_id, _ = await ck.create_thread("hello")
    long_id = random_text(MAX_ID_CHARS + 1, 2)
    if type_ in ("threads.create", "threads.add_user_message"):
        params = {**params, "input": user_input("x", attachments=[long_id])}
    r = await ck.request(type_, fill(params, {"{id}": long_id, "{thread}": thread_id}))
    assert_json_error(r, 400, "invalid_request")
    assert r.json()["error"]["field"].startswith(f"{type_}.params."), r.text
    # one character less is a well-formed id that names nothing: 404, as any unknown id
    fitting = long_id[:MAX_ID_CHARS]
    if type_ in ("threads.create", "threads.add_user_message"):
        params = {**params, "input": user_input("x", attachments=[fitting])}
    r = await ck.request(type_, fill(params, {"{id}": fitting, "{thread}": thread_id}))
    assert_json_error(r, 404, "not_found")


async def test_file_routes_bound_the_id_in_the_path(
    live: tuple[ChatKitClient, httpx.AsyncClient],
) -> None:
    ck, http = live
    long_id = random_text(MAX_ID_CHARS + 1, 3)
    auth = ck.auth("alice")
    for method, path in (
        ("GET", f"/files/{long_id}"),
        ("DELETE", f"/files/{long_id}"),
        ("GET", f"/files/{long_id}/preview?u=alice&e=1&s=x"),
        ("PUT", f"/files/{long_id}/upload?u=alice&e=1&s=x"),
    ):
        response = await http.request(method, path, headers=auth)
        assert_json_error(response, 400, "invalid_request")


# --- limit (docs/reliability.md: bad limits get a 400) -------------------------------------------


@pytest.mark.parametrize("kind", ["threads.list", "items.list"])
async def test_limit_is_a_json_integer_from_1_to_the_page_cap(
    make_client: MakeClient, kind: str
) -> None:
    ck = await make_client()
    thread_id, _ = await ck.create_thread("hello")
    base = {"thread_id": thread_id} if kind == "items.list" else {}
    for bad in (0, -1, True, False, "10", "1", 3.0, 2.5, MAX_PAGE_SIZE + 1, 2**63, 10**30, [], {}):
        r = await ck.request(kind, {**base, "limit": bad})
        assert_json_error(r, 400, "invalid_request")
        assert r.json()["error"].get("field") == f"{kind}.params.limit", (bad, r.text)
    for good in (1, 7, MAX_PAGE_SIZE, None):
        page = await ck.call(kind, {**base, "limit": good})
        assert len(page["data"]) <= (good or 20)


# --- redirects ---------------------------------------------------------------------------------


async def test_no_redirect_carries_the_requests_host(
    live: tuple[ChatKitClient, httpx.AsyncClient],
) -> None:
    ck, http = live
    for method, path in (
        ("POST", ck.path + "/"),
        ("POST", "/files/"),
        ("GET", "/healthz/"),
        ("GET", "/readyz/"),
    ):
        response = await http.request(
            method, path, headers={**ck.auth("alice"), "Host": "evil.example"}, content=b"{}"
        )
        assert "location" not in response.headers, (path, response.headers)
        assert "evil.example" not in response.text
        assert_json_error(response, 404, "not_found")
