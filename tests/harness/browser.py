"""A real headless Chromium for the browser tests, driven by Playwright, and ``make run``'s server.

* ``chromium_browser`` starts the system Chromium (Playwright cannot download browsers here) with
  the flags this closed network needs;
* ``STAND_IN_SCRIPT`` replaces ChatKit's CDN script. The real component is published only on
  cdn.platform.openai.com, which these machines cannot reach, so tests route that URL to a tiny
  custom element that records the options the page gives it (``window.__chatkit``). What is
  tested is the page's side of the contract: the element is created and pointed at this
  backend, and the ``fetch`` it is given really authenticates against it;
* ``DevServer`` runs ``python -m app serve`` (what ``make run`` runs) in development mode and
  reads the page URL from its first screen.

A missing Chromium (or nginx, or frontend build) fails the tests when ``CI`` is set, and skips
them elsewhere with the command that installs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from playwright.async_api import Browser, Page, Route, async_playwright

from tests.harness.deploy import PROJECT_ROOT, find_chromium, free_port, require

CHATKIT_SCRIPT_URL = "https://cdn.platform.openai.com/deployments/chatkit/chatkit.js"
FRONTEND_DIST = PROJECT_ROOT / "frontend" / "dist"

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Defines <openai-chatkit> the way the CDN script does, minus the UI: setOptions is recorded
# (functions as their type, so the record is JSON) and the options object is kept for calls.
STAND_IN_SCRIPT = """
class ChatKitStandIn extends HTMLElement {
  setOptions(options) {
    const plain = JSON.parse(JSON.stringify(options, (key, value) =>
      typeof value === "function" ? "[function]" : value));
    window.__chatkitOptions = options;
    window.__chatkit = { options: plain, calls: (window.__chatkit?.calls ?? 0) + 1 };
  }
}
customElements.define("openai-chatkit", ChatKitStandIn);
"""


def require_frontend_build() -> Path:
    built = FRONTEND_DIST / "index.html"
    return require(FRONTEND_DIST if built.is_file() else None, "frontend/dist", ".ci/frontend.sh")  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def chromium_browser() -> AsyncIterator[Browser]:
    """The system Chromium, headless, driven by Playwright. Chromium is looked for before
    Playwright's driver starts: on a machine without it the test skips (fails in CI) with that
    reason, not with the driver's own missing libraries (its node needs libatomic)."""
    binary = require(find_chromium(), "chromium", "apt-get install chromium")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=binary, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


async def serve_stand_in(route: Route) -> None:
    await route.fulfill(status=200, content_type="text/javascript", body=STAND_IN_SCRIPT)


async def cdn_unreachable(route: Route) -> None:
    await route.abort("internetdisconnected")


async def chatkit_options(page: Page, timeout_ms: float = 15_000) -> dict[str, Any]:
    """The options the page set on ``<openai-chatkit>`` (stand-in), once it has."""
    await page.wait_for_function("() => window.__chatkit !== undefined", timeout=timeout_ms)
    record: dict[str, Any] = await page.evaluate("() => window.__chatkit")
    return record


# The page's own api.fetch, called in the page: the request a real ChatKit would send.
CALL_API_FETCH = """async ([url, body]) => {
  const options = window.__chatkitOptions;
  const response = await options.api.fetch(url ?? options.api.url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: response.status, text: await response.text() };
}"""


@dataclass
class DevServer:
    """``python -m app serve`` with no JWT settings: development mode, as ``make run`` starts."""

    database_url: str
    data_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    first_screen: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("JWT_", "PRODUCTION", "PYTEST_", "CORS_", "OPENAI_"))
        }
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "DATA_DIR": str(self.data_dir),
                "PORT": str(self.port),
                # Two-phase upload URLs are built from it (docs/frontend.md).
                "PUBLIC_BASE_URL": self.base_url,
                "OFFLINE_WORD_DELAY_SECONDS": "0",
                "THREAD_TITLES": "off",
                "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    async def start(self, timeout: float = 90) -> DevServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / "serve.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"],
            cwd=PROJECT_ROOT,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        loop = asyncio.get_running_loop()
        while not any("curl -N" in line for line in self.first_screen):
            line = await asyncio.wait_for(loop.run_in_executor(None, stdout.readline), timeout)
            if not line:
                raise RuntimeError(f"serve exited before its first screen:\n{self.log()}")
            self.first_screen.append(line.decode())
        async with httpx.AsyncClient(timeout=2) as http:
            for _ in range(int(timeout * 20)):
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{self.base_url}/readyz")).status_code == 200:
                        return self
                await asyncio.sleep(0.05)
        raise TimeoutError(f"serve not ready:\n{self.log()}")

    def page_url(self) -> str:
        """The page URL the first screen names."""
        for line in self.first_screen:
            match = re.search(r"Chat page.*?(http://\S+/)\s*$", line)
            if match:
                return match.group(1)
        raise AssertionError(f"no page URL on the first screen: {self.first_screen}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None

    def log(self) -> str:
        path = self.data_dir / "serve.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""
