"""The frontend's search box (frontend/src/Search.tsx) in Chromium, served by nginx in front of
the real backend: typing finds the signed-in user's threads (never another user's), matched
words are marked as text (a message's HTML stays text), and choosing a result opens its thread
in the ChatKit component (``setThreadId`` on the recording stand-in of tests/harness/browser.py).

A production build has no sign-in until a team plugs theirs into src/auth.ts; the test plays
that part by adding the user's Bearer token to the search requests on their way out.
"""

from __future__ import annotations

from datetime import timedelta

from playwright.async_api import BrowserContext, Page, Route

from app.pg.store import PostgresStore
from tests.harness import factories as f
from tests.harness.browser import CHATKIT_SCRIPT_URL, chatkit_options, serve_stand_in
from tests.harness.deploy import Nginx, bearer_token

USER = "searcher"


async def seed(store: PostgresStore, user: str, title: str, *texts: str) -> str:
    ctx = {"user_id": user}
    thread = f.thread(title=title)
    await store.save_thread(thread, ctx)
    for n, text in enumerate(texts):
        await store.add_thread_item(
            thread.id, f.user_message(thread.id, text, f.T0 + timedelta(seconds=n)), ctx
        )
    return thread.id


async def signed_in_page(ctx: BrowserContext, nginx: Nginx) -> Page:
    page = await ctx.new_page()
    await page.route(CHATKIT_SCRIPT_URL, serve_stand_in)
    token = bearer_token(USER)

    async def with_token(route: Route) -> None:
        headers = {**route.request.headers, "authorization": f"Bearer {token}"}
        await route.continue_(headers=headers)

    await page.route("**/chatkit/threads/search?**", with_token)
    await page.goto(f"{nginx.https_url}/")
    await chatkit_options(page)
    return page


async def test_typing_finds_own_threads_and_a_choice_opens_it(
    site: Nginx,
    context: BrowserContext,
    store: PostgresStore,
) -> None:
    mine = await seed(store, USER, "Trip planning", "book the ferry to the lighthouse island")
    evil_title = '<img src=x onerror="window.__pwned=1"> Recipes'
    other = await seed(store, USER, evil_title, "a lighthouse-shaped cake <b>bold</b>")
    await seed(store, "someone-else", "Their lighthouse", "lighthouse keeper notes")
    page = await signed_in_page(context, site)

    box = page.get_by_role("searchbox", name="Search conversations")
    await box.press_sequentially("lightho", delay=30)  # as typed: a prefix
    hits = page.locator("button.search-hit")
    await hits.first.wait_for()
    assert sorted(await hits.evaluate_all("bs => bs.map(b => b.dataset.threadId)")) == sorted(
        [mine, other]
    )
    # The match is marked; HTML in a title or a message is never markup on the page
    # (ts_headline drops tags from snippets; titles come as written and are shown as text).
    assert "lighthouse" in [m.lower() for m in await page.locator("mark").all_inner_texts()]
    assert await page.locator(".search-results b, .search-results img").count() == 0
    assert evil_title in await page.locator(".search-title").all_inner_texts()
    assert await page.evaluate("() => window.__pwned") is None

    await page.locator(f'button.search-hit[data-thread-id="{mine}"]').click()
    await page.wait_for_function("() => (window.__chatkitThreadIds ?? []).length > 0")
    assert await page.evaluate("() => window.__chatkitThreadIds") == [mine]


async def test_no_match_and_a_refused_search_are_said_plainly(
    site: Nginx,
    context: BrowserContext,
    store: PostgresStore,
) -> None:
    await seed(store, USER, "Trip planning", "ferry times")
    page = await signed_in_page(context, site)
    box = page.get_by_role("searchbox", name="Search conversations")
    await box.fill("submarine ")
    await page.locator(".search-empty").wait_for()
    assert await page.locator("button.search-hit").count() == 0
    # Without the token (no sign-in plugged in) the backend's 401 message is shown.
    await page.unroute("**/chatkit/threads/search?**")
    await box.fill("ferry")
    alert = page.locator(".search-error")
    await alert.wait_for()
    assert (await alert.inner_text()).strip()
