"""Resumable replies in the frontend (docs/runs.md, "The frontend"): the built app
(frontend/dist) in real Chromium, served by the repository's nginx in front of **two** backend
processes on one database, with a TCP proxy (tests/harness/tcpproxy.py) between nginx and
backend A. nginx sends everything to A while it answers; B is A's backup, reached when A
cannot be (a refused connection is passed on to the next server).

The ChatKit component is a conversing stand-in (tests/data/browser/chatkit-conversing-standin.js)
driving the page's ``api.fetch`` as the real one does and recording every event it receives.
Proven:

* a reply whose connection is cut mid-stream (the proxy resets it, and refuses A from then on)
  goes on through B: the component receives every event exactly once, in order, and never
  sees the cut; the page did not follow its own run a second time;
* the stop button (the component aborting its request) cancels the run server-side: the
  partial reply is stored with the SDK's cancel marker;
* a reload mid-reply does not cancel it; the reloaded page asks which run is going in its
  thread, follows it, and once it ends calls ``fetchUpdates()``: the finished reply is in view
  without another reload.

Every cut lands at a known point: the paced model runs in lockstep
(tests/harness/pacedmodel.py), emitting delta i+1 only once the page has acknowledged delta i
(the stand-in hands each delta to a Playwright binding, which acknowledges all but the one the
test holds). No assertion depends on timing; the only clocks are deadlines against hangs.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Browser, Page, Request, Route

from tests.harness.browser import CHATKIT_SCRIPT_URL
from tests.harness.deploy import (
    DELTA_MARK,
    Backend,
    Lockstep,
    Nginx,
    bearer_token,
    find_nginx,
    pace_prompt,
    require,
)
from tests.harness.pg import PgServer
from tests.harness.tcpproxy import TcpProxy

STAND_IN = (
    Path(__file__).parents[1] / "data" / "browser" / "chatkit-conversing-standin.js"
).read_text()
DEADLINE = 90  # seconds; only against hangs
WAIT_MS = DEADLINE * 1000
DELTAS = 6
HOLD = 2  # the delta the test holds back: the reply cannot go on past it until acknowledged
RUN_ENV = {
    "RUN_HEARTBEAT_SECONDS": "0.3",
    "RUN_POLL_SECONDS": "0.05",
    "RUN_DEAD_AFTER_SECONDS": "10",
}


@pytest.fixture(scope="module")
def backends(
    database_url: str, dist: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Backend]]:
    require(find_nginx(), "nginx", "apt-get install nginx")  # in CI: fails, elsewhere skips
    folder = tmp_path_factory.mktemp("browser-runs")
    pair = [
        Backend(database_url=database_url, extra_env={**RUN_ENV, "DATA_DIR": str(folder / n)})
        for n in "ab"
    ]
    try:
        with ThreadPoolExecutor(2) as pool:  # side by side: each start is mostly imports
            for future in [
                pool.submit(b.start, folder / f"{n}.log") for b, n in zip(pair, "ab", strict=True)
            ]:
                future.result()
        yield pair
    finally:
        for backend in pair:
            backend.stop()


@dataclass
class Site:
    """nginx → (proxy → A) with B as its backup; the page's requests, as sent."""

    nginx: Nginx
    proxy: TcpProxy
    backends: list[Backend]
    dsn: str
    requests: list[Request] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # URLs whose answer the page has read

    def logs(self) -> str:
        return "\n".join(f"--- backend {i} ---\n{b.log()}" for i, b in enumerate(self.backends))

    def sent(self, method: str, fragment: str) -> list[str]:
        return [r.url for r in self.requests if r.method == method and fragment in r.url]

    def requests_to(self, method: str, fragment: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and fragment in r.url]


@pytest.fixture
async def site(
    backends: list[Backend], database_url: str, dist: Path, tmp_path: Path
) -> AsyncIterator[Site]:
    """A fresh nginx per test: its upstream state (A marked failed) never carries over."""
    a, b = backends
    async with TcpProxy("127.0.0.1", a.port) as proxy:
        nginx = Nginx(
            prefix=tmp_path / "nginx", upstream=f"127.0.0.1:{proxy.port}", static_root=dist
        )
        nginx.write_config()
        conf = nginx.prefix / "conf.d" / "default.conf"
        primary = f"    server 127.0.0.1:{proxy.port} max_fails=3 fail_timeout=10s;\n"
        text = conf.read_text()
        assert text.count(primary) == 1
        conf.write_text(text.replace(primary, primary + f"    server 127.0.0.1:{b.port} backup;\n"))
        nginx.start_rendered()
        try:
            yield Site(nginx, proxy, backends, PgServer.dsn(database_url))
        finally:
            nginx.stop()


async def serve_conversing_stand_in(route: Route) -> None:
    await route.fulfill(status=200, content_type="text/javascript", body=STAND_IN)


@dataclass
class Chat:
    page: Page
    user: str
    lockstep: Lockstep
    held: set[int] = field(default_factory=set)

    async def send(self, text: str) -> None:
        await self.page.evaluate(
            "(text) => { void document.querySelector('openai-chatkit').sendUserMessage({ text }); }",
            text,
        )

    async def wait(self, condition: str, arg: Any = None) -> Any:
        handle = await self.page.wait_for_function(condition, arg=arg, timeout=WAIT_MS)
        return await handle.json_value()

    async def wait_for_delta(self, index: int) -> None:
        await self.wait(
            "(mark) => (window.__events ?? []).some((e) => e.delta && e.delta.includes(mark))",
            f"[d{index}@",
        )

    async def events(self) -> list[dict[str, Any]]:
        return list(await self.page.evaluate("() => window.__events ?? []"))


async def open_chat(browser: Browser, site: Site, user: str, lockstep: Lockstep) -> Chat:
    # A production build has no sign-in until a team plugs theirs into src/auth.ts: the test
    # plays that part, sending the user's token with every request.
    context = await browser.new_context(
        ignore_https_errors=True,
        extra_http_headers={"Authorization": f"Bearer {bearer_token(user)}"},
    )
    page = await context.new_page()
    chat = Chat(page, user, lockstep)

    def ack(_source: Any, delta: str) -> None:
        mark = DELTA_MARK.search(delta)
        if mark and int(mark.group(1)) not in chat.held:
            lockstep.ack(int(mark.group(1)))

    await page.expose_binding("__ack", ack)
    await page.route(CHATKIT_SCRIPT_URL, serve_conversing_stand_in)

    def sent(request: Request) -> None:
        site.requests.append(request)

    def answered(request: Request) -> None:
        site.finished.append(request.url)

    page.on("request", sent)
    page.on("requestfinished", answered)
    await page.goto(f"{site.nginx.https_url}/")
    await chat.wait("() => window.__chatkitOptions !== undefined")
    return chat


def new_user() -> str:
    return f"browser-runs-{secrets.token_hex(4)}"


def assert_every_event_once_in_order(events: list[dict[str, Any]]) -> str:
    """ids ``<run>:1..n`` without a gap or a repeat, each delta once; the run id."""
    assert events, "no event"
    run_id = events[0]["id"].rpartition(":")[0]
    assert run_id.startswith("run_")
    assert [e["id"] for e in events] == [f"{run_id}:{i}" for i in range(1, len(events) + 1)]
    marks = [DELTA_MARK.search(e["delta"]) for e in events if e["delta"] is not None]
    assert [int(m.group(1)) for m in marks if m] == list(range(DELTAS))
    return run_id


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for a condition, polling; fails after the deadline (never a sleep as the test)."""
    try:
        async with asyncio.timeout(DEADLINE):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {DEADLINE} s: {what}") from None


async def stored(dsn: str, user: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT type, data::text AS data FROM chatkit_items WHERE user_id = $1 "
            "ORDER BY created_at, seq",
            user,
        )
    finally:
        await conn.close()
    return [(r["type"], r["data"]) for r in rows]


async def run_row(dsn: str, run_id: str) -> tuple[str, int]:
    """The run's state and last logged seq (as the table's owner: no row-level security)."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT state, last_seq FROM chatkit_runs WHERE id = $1", run_id)
    finally:
        await conn.close()
    assert row is not None
    return str(row["state"]), int(row["last_seq"])


async def held_reply(browser: Browser, site: Site, tmp_path: Path) -> Chat:
    """A new user's chat whose reply is held at delta ``HOLD`` (unacknowledged: the paced
    model waits there until the test acknowledges it)."""
    lockstep = Lockstep(tmp_path / "acks")
    chat = await open_chat(browser, site, new_user(), lockstep)
    chat.held.add(HOLD)
    await chat.send(pace_prompt(DELTAS, 0, lockstep=lockstep))
    await chat.wait_for_delta(HOLD)
    return chat


async def test_a_cut_mid_reply_resumes_through_b_every_event_once_in_order(
    browser: Browser, site: Site, tmp_path: Path
) -> None:
    chat = await held_reply(browser, site, tmp_path)
    lockstep = chat.lockstep
    # The reply streams from A (through the proxy). The page asked which run is going in its
    # new thread, and does not follow the run it streams itself.
    assert site.proxy.open_connections >= 1

    async def asked() -> bool:
        return any("/threads/" in url and url.endswith("/run") for url in site.finished)

    await until(asked, "the page asked which run is going in its new thread")
    assert site.sent("GET", "/events") == []
    before = len(await chat.events())

    site.proxy.refuse()  # A is unreachable from now on: nginx passes requests to B
    assert await site.proxy.cut() >= 1  # reset mid-reply, between nginx and A
    lockstep.ack(HOLD)  # only now may the reply go on: everything after comes through B
    reply = await chat.wait("() => window.__reply.ended && window.__reply")
    assert reply["error"] is None, (reply, site.logs())
    assert reply["status"] == 200

    events = await chat.events()
    assert len(events) > before
    run_id = assert_every_event_once_in_order(events)
    assert any(e["type"] == "thread.item.done" for e in events[before:])
    # Everything the run logged, no more, no less.
    assert await run_row(site.dsn, run_id) == ("completed", len(events))
    # Every request for the run's events is the resume after the cut, from the last event
    # the component had (one following the run a second time would start elsewhere).
    resumes = site.requests_to("GET", f"/runs/{run_id}/events")
    assert resumes, "the page resumed after the cut"
    for resume in resumes:
        assert (await resume.all_headers())["last-event-id"] == f"{run_id}:{before}"
    assert site.sent("POST", "/cancel") == [], "a dropped connection is not a stop"
    # The reply ran to its end in A and is stored whole.
    items = await stored(site.dsn, chat.user)
    assert [t for t, _ in items][:2] == ["user_message", "assistant_message"]
    assert items[1][0] == "assistant_message" and "timeout" not in items[1][1]
    assert all(f"[d{i}@" in items[1][1] for i in range(DELTAS))
    await chat.page.context.close()


@pytest.mark.parametrize("how", ["abort", "cancel-body"])
async def test_the_stop_button_cancels_the_run_server_side(
    browser: Browser, site: Site, tmp_path: Path, how: str
) -> None:
    """Whether the component aborts its request or cancels the response's body."""
    chat = await held_reply(browser, site, tmp_path)
    user = chat.user
    await chat.page.evaluate("(how) => document.querySelector('openai-chatkit').stop(how)", how)
    reply = await chat.wait("() => window.__reply.ended && window.__reply")
    if how == "abort":
        assert "AbortError" in (reply["error"] or ""), reply
    else:
        assert reply["error"] is None, reply
    run_id = assert_run_prefix(await chat.events())
    assert site.sent("POST", f"/runs/{run_id}/cancel"), "the abort became a cancel"

    async def cancelled_and_stored() -> bool:
        marker = [t for t, _ in await stored(site.dsn, user)][-1:] == ["sdk_hidden_context"]
        return marker and (await run_row(site.dsn, run_id))[0] == "cancelled"

    await until(cancelled_and_stored, "the partial reply stored with the cancel marker")
    items = await stored(site.dsn, user)
    assert [t for t, _ in items] == ["user_message", "assistant_message", "sdk_hidden_context"]
    assert f"[d{HOLD}@" in items[1][1] and f"[d{HOLD + 1}@" not in items[1][1]
    assert "cancelled" in items[2][1]
    await chat.page.context.close()


def assert_run_prefix(events: list[dict[str, Any]]) -> str:
    """The events so far: ids ``<run>:1..n`` in order, deltas 0..HOLD; the run id."""
    run_id = events[0]["id"].rpartition(":")[0]
    assert [e["id"] for e in events] == [f"{run_id}:{i}" for i in range(1, len(events) + 1)]
    marks = [DELTA_MARK.search(e["delta"]) for e in events if e["delta"] is not None]
    assert [int(m.group(1)) for m in marks if m] == list(range(HOLD + 1))
    return run_id


async def test_a_reload_mid_reply_shows_the_finished_reply_when_it_ends(
    browser: Browser, site: Site, tmp_path: Path
) -> None:
    chat = await held_reply(browser, site, tmp_path)
    lockstep = chat.lockstep
    thread_id = await chat.wait("() => sessionStorage.getItem('chatkit-pg:thread')")
    run_id = assert_run_prefix(await chat.events())

    async with chat.page.expect_request(
        lambda r: r.method == "GET" and f"/runs/{run_id}/events" in r.url, timeout=WAIT_MS
    ):
        await chat.page.reload()
    # The reloaded page opened the thread, asked which run is going in it, and follows it.
    options = await chat.page.evaluate("() => window.__chatkitOptions.initialThread")
    assert options == thread_id
    assert site.sent("GET", f"/threads/{thread_id}/run")
    assert site.sent("POST", "/cancel") == [], "a reload is not a stop"
    initial = await chat.wait(
        "() => (window.__views ?? []).find((v) => v.why === 'initial') ?? false"
    )
    assert not any(  # the reply is not in the thread yet: it is still running
        f"[d{DELTAS - 1}@" in str(item) for item in initial["items"]
    )

    for index in range(HOLD, DELTAS):  # nobody reads the reply now: let it run to its end
        lockstep.ack(index)
    updated = await chat.wait(
        "() => (window.__views ?? []).find((v) => v.why === 'fetchUpdates') ?? false"
    )
    assistant = [i for i in updated["items"] if i["type"] == "assistant_message"]
    assert len(assistant) == 1, updated
    text = "".join(part.get("text", "") for part in assistant[0]["content"])
    assert all(f"[d{i}@" in text for i in range(DELTAS)), text
    await chat.page.context.close()
