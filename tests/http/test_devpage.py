"""The development page (app/http/devpage.py): ``make run`` serves ``/`` and ``/dev/token`` in
development mode to this machine only, and nowhere else.

The browser tests start ``python -m app serve`` as ``make run`` does, open the URL its first
screen names in Chromium (Playwright) with ChatKit's CDN script replaced by a recording
stand-in (tests/harness/browser.py), and send a real ChatKit request through the ``fetch`` the
page hands to the component.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from playwright.async_api import Browser
from pydantic import SecretStr

from app.cli.serve import try_it
from app.http import devpage
from app.http.auth import DEV_SECRET_FILE
from app.main import create_app
from app.settings import Settings
from tests.harness.browser import (
    CALL_API_FETCH,
    CHATKIT_SCRIPT_URL,
    DevServer,
    cdn_unreachable,
    chatkit_options,
    chromium_browser,
    serve_stand_in,
)
from tests.harness.chatkit_client import JWT_TEST_SECRET
from tests.harness.deploy import free_port


def threads_create(text: str) -> dict[str, Any]:
    return {
        "type": "threads.create",
        "params": {
            "input": {
                "content": [{"type": "input_text", "text": text}],
                "attachments": [],
                "inference_options": {},
            }
        },
    }


@pytest.fixture(scope="module")
async def dev_server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DevServer]:
    server = DevServer(database_url, tmp_path_factory.mktemp("devserver"))
    try:
        yield await server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium_browser() as chromium:
        yield chromium


# --- in a browser ----------------------------------------------------------------------------


async def test_make_run_names_the_page_and_it_mounts_chatkit_against_this_backend(
    dev_server: DevServer, browser: Browser
) -> None:
    url = dev_server.page_url()
    assert url == f"{dev_server.base_url}/"
    page = await browser.new_page()
    try:
        await page.route(CHATKIT_SCRIPT_URL, serve_stand_in)
        await page.goto(url)
        record = await chatkit_options(page)
        options = record["options"]
        assert record["calls"] == 1
        assert await page.locator("openai-chatkit").count() == 1
        api = options["api"]
        assert api["url"] == f"{dev_server.base_url}/chatkit"
        assert api["domainKey"] == devpage.LOCAL_DOMAIN_KEY
        assert api["fetch"] == "[function]"
        assert api["uploadStrategy"] == {"type": "two_phase"}
        attachments = options["composer"]["attachments"]
        assert attachments["enabled"] is True
        assert attachments["maxSize"] == Settings(_env_file=None).max_upload_bytes  # type: ignore[call-arg]
        assert ".png" in attachments["accept"]["image/png"]
        assert len(options["startScreen"]["prompts"]) == 3
        assert await page.locator("#status").is_hidden()

        # The fetch the component would use: a real ChatKit request, authenticated by the
        # page's development token, answered by the offline model.
        reply = await page.evaluate(CALL_API_FETCH, [None, threads_create("Hello from the page")])
        assert reply["status"] == 200, reply
        events = [
            json.loads(line[5:]) for line in reply["text"].splitlines() if line.startswith("data:")
        ]
        assert events[0]["type"] == "thread.created"
        done = [e["item"]["type"] for e in events if e["type"] == "thread.item.done"]
        assert done == ["user_message", "assistant_message"]
    finally:
        await page.close()


# What ChatKit does with uploadStrategy two_phase: attachments.create through the page's fetch,
# then the bytes to the descriptor's URL (signed, no token), as multipart.
TWO_PHASE_UPLOAD = """async (text) => {
  const options = window.__chatkitOptions;
  const created = await options.api.fetch(options.api.url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ type: "attachments.create",
                           params: { name: "note.txt", size: text.length, mime_type: "text/plain" } }),
  });
  const attachment = await created.json();
  const descriptor = attachment.upload_descriptor;
  const form = new FormData();
  form.append("file", new Blob([text], { type: "text/plain" }), "note.txt");
  const uploaded = await fetch(descriptor.url, { method: descriptor.method, body: form });
  return { created: created.status, descriptor, uploaded: uploaded.status,
           attachment: await uploaded.json() };
}"""


async def test_two_phase_upload_from_the_page_reaches_this_backend(
    dev_server: DevServer, browser: Browser
) -> None:
    page = await browser.new_page()
    try:
        await page.route(CHATKIT_SCRIPT_URL, serve_stand_in)
        await page.goto(dev_server.page_url())
        options = (await chatkit_options(page))["options"]
        assert options["api"]["uploadStrategy"] == {"type": "two_phase"}
        result = await page.evaluate(TWO_PHASE_UPLOAD, "hello, postgres")
        assert result["created"] == 200, result
        assert result["descriptor"]["url"].startswith(f"{dev_server.base_url}/files/")
        assert result["uploaded"] == 200, result
        assert result["attachment"]["upload_descriptor"] is None, "the upload completed"
        async with httpx.AsyncClient(timeout=10) as http:
            token = (await http.get(f"{dev_server.base_url}/dev/token")).json()["token"]
            download = await http.get(
                f"{dev_server.base_url}/files/{result['attachment']['id']}",
                headers={"Authorization": f"Bearer {token}"},
            )
        assert download.status_code == 200 and download.content == b"hello, postgres"
    finally:
        await page.close()


async def test_page_says_so_when_the_chatkit_script_cannot_load(
    dev_server: DevServer, browser: Browser
) -> None:
    page = await browser.new_page()
    try:
        await page.route(CHATKIT_SCRIPT_URL, cdn_unreachable)
        await page.goto(dev_server.page_url())
        status = page.locator("#status")
        await status.wait_for(state="visible", timeout=15_000)
        text = await status.inner_text()
        assert "could not be loaded" in text and CHATKIT_SCRIPT_URL in text
        assert await page.locator("openai-chatkit").count() == 0
    finally:
        await page.close()


async def test_page_without_the_stand_in_still_tells_the_user(
    dev_server: DevServer, browser: Browser
) -> None:
    """Control for the stand-in: unrouted, the closed network's failure is shown the same way
    (no test here ever sees the real component)."""
    page = await browser.new_page()
    try:
        await page.route(CHATKIT_SCRIPT_URL, lambda route: route.abort("addressunreachable"))
        await page.goto(dev_server.page_url())
        await page.locator("#status").wait_for(state="visible", timeout=15_000)
        assert await page.evaluate("() => window.__chatkit === undefined")
    finally:
        await page.close()


# --- the token route ---------------------------------------------------------------------------


async def test_dev_token_is_a_token_for_the_development_user(dev_server: DevServer) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{dev_server.base_url}/dev/token")
        for host in ("localhost", f"localhost:{dev_server.port}", f"[::1]:{dev_server.port}"):
            assert (
                await http.get(f"{dev_server.base_url}/dev/token", headers={"Host": host})
            ).status_code == 200, host
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert list(body) == ["token"]
    secret = (dev_server.data_dir / DEV_SECRET_FILE).read_text().strip()
    claims = jwt.decode(body["token"], secret, algorithms=["HS256"])
    assert claims["sub"] == "dev"
    assert claims["exp"] - claims["iat"] == devpage.TOKEN_TTL_SECONDS


async def test_dev_routes_refuse_a_foreign_host_header(dev_server: DevServer) -> None:
    """DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends its own name."""
    async with httpx.AsyncClient(timeout=10) as http:
        for path in ("/", "/dev/token"):
            for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", ""):
                response = await http.get(f"{dev_server.base_url}{path}", headers={"Host": host})
                assert response.status_code == 404, (path, host)
                assert response.json()["error"]["code"] == "not_found"


# --- in process: who gets a 404 ---------------------------------------------------------------


async def get(app: Any, path: str, client: tuple[str, int] = ("127.0.0.1", 50000)) -> Any:
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        return await http.get(path)


def without_request_id(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    body["error"].pop("request_id", None)
    return body


def dev_settings(tmp_path: Path) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "auth",
    [
        {"jwt_secret": SecretStr(JWT_TEST_SECRET)},
        {"jwt_secret": SecretStr(JWT_TEST_SECRET), "production": True},
        {"jwt_jwks_url": "https://issuer.example/.well-known/jwks.json"},
    ],
    ids=["jwt-secret", "production", "jwks"],
)
async def test_outside_development_mode_both_routes_are_any_404(
    tmp_path: Path, auth: dict[str, Any]
) -> None:
    app = create_app(dev_settings(tmp_path).model_copy(update=auth))
    unknown = await get(app, "/no-such-page")
    assert unknown.status_code == 404
    for path in ("/", "/dev/token"):
        response = await get(app, path)
        assert response.status_code == 404, path
        assert without_request_id(response) == without_request_id(unknown)
        assert response.headers["content-type"] == unknown.headers["content-type"]
    assert not (tmp_path / DEV_SECRET_FILE).exists(), "no development secret was created"


async def test_development_mode_serves_local_clients_only(tmp_path: Path) -> None:
    app = create_app(dev_settings(tmp_path))
    assert (await get(app, "/")).status_code == 200
    assert (await get(app, "/", client=("::1", 50000))).status_code == 200
    assert (await get(app, "/dev/token")).status_code == 200
    unknown = await get(app, "/no-such-page", client=("203.0.113.9", 50000))
    for path in ("/", "/dev/token"):
        for client in (("203.0.113.9", 50000), ("10.0.0.2", 50000), ("172.30.80.10", 50000)):
            response = await get(app, path, client=client)
            assert response.status_code == 404, (path, client)
            assert without_request_id(response) == without_request_id(unknown)


async def test_page_config_is_json_that_cannot_close_its_script_tag(tmp_path: Path) -> None:
    settings = dev_settings(tmp_path).model_copy(
        update={"allowed_mime_types": ["text/plain", "application/x-</script><b>"]}
    )
    html = devpage.render_page(settings)
    start = html.index('id="chatkit-pg-config">') + len('id="chatkit-pg-config">')
    raw = html[start : html.index("</script>", start)]
    config = json.loads(raw)
    assert config["chatkitPath"] == "/chatkit"
    assert "application/x-</script><b>" in config["accept"]
    assert "__CHATKIT_PG_CONFIG__" not in html


def test_first_screen_names_the_page_only_in_development_mode(tmp_path: Path) -> None:
    port = free_port()
    dev = dev_settings(tmp_path).model_copy(update={"port": port})
    assert f"Chat page (development, this machine only): http://127.0.0.1:{port}/" in try_it(dev)
    secret = dev.model_copy(update={"jwt_secret": SecretStr(JWT_TEST_SECRET)})
    assert "Chat page" not in try_it(secret)
