"""The built frontend (frontend/dist, from `.ci/frontend.sh`) served by the repository's nginx
templates in a real nginx, in front of the real backend, opened in Chromium (Playwright).

ChatKit's CDN script is routed to the recording stand-in of tests/harness/browser.py (the real
component cannot load on this network). Checked: the React app creates ``<openai-chatkit>``
with options pointing at this backend, its ``fetch`` reaches the backend through nginx, its
error display and CDN message appear; and a page on the frontend's origin may call a backend
on another origin with a development token when, and only when, CORS_ORIGINS lists it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext

from tests.harness.browser import (
    CALL_API_FETCH,
    CHATKIT_SCRIPT_URL,
    DevServer,
    cdn_unreachable,
    chatkit_options,
    chromium_browser,
    require,
    require_frontend_build,
    serve_stand_in,
)
from tests.harness.deploy import Backend, Nginx, find_nginx

THREADS_LIST = {"type": "threads.list", "params": {"limit": 5}}


@pytest.fixture(scope="module")
def dist() -> Path:
    return require_frontend_build()


@pytest.fixture(scope="module")
def backend(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, dist: Path
) -> Iterator[Backend]:
    require(find_nginx(), "nginx", "apt-get install nginx")
    server = Backend(database_url=database_url)
    server.start(tmp_path_factory.mktemp("frontend-backend") / "uvicorn.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(backend: Backend, dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    nginx = Nginx(
        prefix=tmp_path_factory.mktemp("frontend-nginx"),
        upstream=f"127.0.0.1:{backend.port}",
        static_root=dist,
    ).start()
    yield nginx
    nginx.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium_browser() as chromium:
        yield chromium


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    # nginx's certificate is a fresh self-signed one.
    ctx = await browser.new_context(ignore_https_errors=True)
    yield ctx
    await ctx.close()


async def test_nginx_serves_the_built_frontend_and_it_mounts_chatkit(
    site: Nginx, context: BrowserContext
) -> None:
    page = await context.new_page()
    await page.route(CHATKIT_SCRIPT_URL, serve_stand_in)
    response = await page.goto(f"{site.https_url}/")
    assert response is not None and response.status == 200
    assert response.headers["x-frame-options"] == "DENY", "nginx's security headers"
    options = (await chatkit_options(page))["options"]
    api = options["api"]
    # Relative by default: the backend behind the same nginx.
    assert await page.evaluate("(url) => new URL(url, location.href).href", api["url"]) == (
        f"{site.https_url}/chatkit"
    )
    assert api["domainKey"] == "domain_pk_localhost_dev"
    assert api["uploadStrategy"] == {"type": "two_phase"}
    assert api["fetch"] == "[function]"
    assert options["theme"]["colorScheme"] in ("light", "dark")
    assert [p["label"] for p in options["startScreen"]["prompts"]] == [
        "What can you do?",
        "Write a haiku",
        "Explain",
    ]
    assert options["composer"]["attachments"]["enabled"] is True
    assert await page.locator("openai-chatkit").count() == 1

    # The app's fetch goes through nginx to the backend. A production build has no token
    # until a team plugs its sign-in into src/auth.ts, so the backend says 401 (JSON).
    reply = await page.evaluate(CALL_API_FETCH, [None, THREADS_LIST])
    assert reply["status"] == 401
    assert json.loads(reply["text"])["error"]["code"] == "unauthorized"

    # A client-side route falls back to the app.
    spa = await page.goto(f"{site.https_url}/threads/some-id")
    assert spa is not None and spa.status == 200
    await chatkit_options(page)


async def test_frontend_shows_chatkit_errors(site: Nginx, context: BrowserContext) -> None:
    page = await context.new_page()
    await page.route(CHATKIT_SCRIPT_URL, serve_stand_in)
    await page.goto(f"{site.https_url}/")
    await chatkit_options(page)
    assert await page.get_by_role("alert").count() == 0
    await page.evaluate(
        """() => document.querySelector("openai-chatkit").dispatchEvent(
             new CustomEvent("chatkit.error", { detail: { error: new Error("Quota exceeded") } }))"""
    )
    alert = page.get_by_role("alert")
    await alert.wait_for(state="visible", timeout=10_000)
    assert "Quota exceeded" in await alert.inner_text()


async def test_frontend_says_so_when_the_chatkit_script_cannot_load(
    site: Nginx, context: BrowserContext
) -> None:
    page = await context.new_page()
    await page.route(CHATKIT_SCRIPT_URL, cdn_unreachable)
    await page.goto(f"{site.https_url}/")
    alert = page.get_by_role("alert")
    await alert.wait_for(state="visible", timeout=15_000)
    assert "could not be loaded" in await alert.inner_text()


# --- CORS: the frontend's origin calling a backend on another origin ------------------------


@pytest.fixture(scope="module")
async def cors_backend(
    database_url: str, site: Nginx, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DevServer]:
    """``make run`` with CORS_ORIGINS naming the frontend's origin (README: connecting a
    frontend)."""
    server = DevServer(
        database_url,
        tmp_path_factory.mktemp("cors-devserver"),
        extra_env={"CORS_ORIGINS": site.https_url},
    )
    try:
        yield await server.start()
    finally:
        server.stop()


# Runs on a page of the frontend's origin: the development token, then a ChatKit request.
TOKEN_THEN_CHATKIT = """async (base) => {
  try {
    const token = (await (await fetch(base + "/dev/token")).json()).token;
    const response = await fetch(base + "/chatkit", {
      method: "POST",
      headers: { "Authorization": "Bearer " + token, "Content-Type": "application/json" },
      body: JSON.stringify({ type: "threads.list", params: { limit: 5 } }),
    });
    return { status: response.status, body: await response.json(),
             requestId: response.headers.get("x-request-id") };
  } catch (error) {
    return { error: String(error) };
  }
}"""


async def test_frontend_origin_may_call_a_backend_listing_it_in_cors_origins(
    site: Nginx, cors_backend: DevServer, context: BrowserContext
) -> None:
    page = await context.new_page()
    await page.route(CHATKIT_SCRIPT_URL, serve_stand_in)
    await page.goto(f"{site.https_url}/")
    assert await page.evaluate("() => location.origin") == site.https_url
    result = await page.evaluate(TOKEN_THEN_CHATKIT, cors_backend.base_url)
    assert result.get("error") is None, result
    assert result["status"] == 200
    assert "data" in result["body"]
    assert result["requestId"], "X-Request-ID is exposed to the page"


async def test_other_origins_are_refused_by_cors(
    site: Nginx, cors_backend: DevServer, context: BrowserContext
) -> None:
    """Control: the same script on an origin not in CORS_ORIGINS (nginx's plain-HTTP port,
    also loopback) cannot read the backend's answers."""
    page = await context.new_page()
    probe = site.prefix / "acme" / ".well-known" / "acme-challenge" / "probe"
    probe.write_text("probe")
    await page.goto(f"{site.http_url}/.well-known/acme-challenge/probe")
    assert await page.evaluate("() => location.origin") == site.http_url
    result = await page.evaluate(TOKEN_THEN_CHATKIT, cors_backend.base_url)
    assert "Failed to fetch" in result.get("error", ""), result
