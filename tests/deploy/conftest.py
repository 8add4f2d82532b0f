"""What the browser tests of this folder share: the built frontend, a backend process and the
repository's nginx in front of both, and a headless Chromium (tests/harness/browser.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext

from tests.harness.browser import chromium_browser, require, require_frontend_build
from tests.harness.deploy import Backend, Nginx, find_nginx


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
