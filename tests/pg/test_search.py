"""Thread search (app.pg.search, migration 0005) against real PostgreSQL: what is indexed, what
never is, one user's rows only (through the store's filter and through row-level security),
ranking, prefixes, keyset pages, the configuration setting, the migration's backfill, and the
user's text never raising as query syntax (hypothesis)."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
from chatkit.types import AssistantMessageContent, AssistantMessageItem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import ConfigurationError, InvalidInputError
from app.ids import new_id
from app.pg.pool import open_pool
from app.pg.search import (
    MAX_LIMIT,
    MAX_QUERY_CHARS,
    SQL_BEGIN_CUSTOM,
    SQL_QUERY,
    SQL_SEARCH,
    Cursor,
    SearchPage,
    ThreadSearch,
    check_search_config,
    parse_query,
    segments,
)
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness import factories as f
from tests.harness.pg import PgServer, migrate

ALICE = {"user_id": "alice"}
BOB = {"user_id": "bob"}


@pytest.fixture
def search(store: PostgresStore) -> ThreadSearch:
    return ThreadSearch(store.pool)


def assistant(thread_id: str, text: str, n: int = 0) -> AssistantMessageItem:
    return AssistantMessageItem(
        id=new_id("message"),
        thread_id=thread_id,
        created_at=f.T0 + timedelta(seconds=n),
        content=[AssistantMessageContent(text=text)],
    )


async def thread_with(
    store: PostgresStore, ctx: dict[str, str], *texts: str, title: str | None = None
) -> tuple[str, list[str]]:
    """A thread of ``ctx``'s user whose messages say ``texts`` (user, assistant, alternating)."""
    thread = f.thread(title=title)
    await store.save_thread(thread, ctx)
    ids = []
    for n, text in enumerate(texts):
        item = (
            f.user_message(thread.id, text, f.T0 + timedelta(seconds=n))
            if n % 2 == 0
            else assistant(thread.id, text, n)
        )
        await store.add_thread_item(thread.id, item, ctx)
        ids.append(item.id)
    return thread.id, ids


def raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def found(page: SearchPage) -> list[tuple[str, str | None]]:
    return [(h.thread_id, h.item_id) for h in page.hits]


# --- what is indexed ---------------------------------------------------------------------------


async def test_titles_and_message_text_are_found(
    store: PostgresStore, search: ThreadSearch
) -> None:
    tid, (user_item, reply) = await thread_with(
        store, ALICE, "where is the lighthouse", "the harbour lighthouse", title="Lighthouse trip"
    )
    page = await search.search("alice", "lighthouse")
    # The title (weighted A) first, then the messages.
    assert found(page)[0] == (tid, None)
    assert set(found(page)[1:]) == {(tid, user_item), (tid, reply)}
    assert page.next_cursor is None
    title_hit = page.hits[0]
    assert title_hit.title == "Lighthouse trip"
    assert [s.text for s in title_hit.snippet if s.hit] == ["Lighthouse"]
    reply_hit = next(h for h in page.hits if h.item_id == reply)
    assert "".join(s.text for s in reply_hit.snippet) == "the harbour lighthouse"
    assert reply_hit.title == "Lighthouse trip"


async def test_hidden_context_tools_and_widgets_are_never_indexed(
    store: PostgresStore, search: ThreadSearch
) -> None:
    thread = f.thread()
    await store.save_thread(thread, ALICE)
    for item in f.all_item_types(thread.id):
        await store.add_thread_item(thread.id, item, ALICE)
    # Words of the hidden context ("ctx", "cancelled"), the tool call, the widget and the task.
    for word in ("ctx", "secret", "cancelled", "get_location", "Widget", "did", "Task"):
        assert (await search.search("alice", f"{word} ")).hits == [], word
    # The user message's text and the assistant's are.
    assert len((await search.search("alice", "summarise ")).hits) == 1
    assert len((await search.search("alice", "summary ")).hits) == 1
    # Only user and assistant messages carry a vector.
    async with store.connection() as conn:
        kinds = await conn.fetch(
            "SELECT DISTINCT type FROM chatkit_items WHERE search_vector IS NOT NULL"
        )
    assert {r["type"] for r in kinds} == {"user_message", "assistant_message"}


async def test_edits_deletes_and_retitles_keep_the_index(
    store: PostgresStore, search: ThreadSearch
) -> None:
    thread = f.thread(title="first name")
    await store.save_thread(thread, ALICE)
    reply = assistant(thread.id, "original wording")
    await store.add_thread_item(thread.id, reply, ALICE)
    await store.save_item(
        thread.id,
        reply.model_copy(update={"content": [AssistantMessageContent(text="rewritten wording")]}),
        ALICE,
    )
    assert (await search.search("alice", "original ")).hits == []
    assert found(await search.search("alice", "rewritten ")) == [(thread.id, reply.id)]
    await store.save_thread(thread.model_copy(update={"title": "second name"}), ALICE)
    assert (await search.search("alice", "first ")).hits == []
    assert found(await search.search("alice", "second ")) == [(thread.id, None)]
    await store.delete_thread_item(thread.id, reply.id, ALICE)
    assert (await search.search("alice", "rewritten ")).hits == []


async def test_highlight_marks_in_user_text_are_not_taken_for_ours(
    store: PostgresStore, search: ThreadSearch
) -> None:
    await thread_with(store, ALICE, "plain \x01fake\x02 marks and a needle")
    (hit,) = (await search.search("alice", "needle")).hits
    assert [s.text for s in hit.snippet if s.hit] == ["needle"]
    assert "\x01" not in "".join(s.text for s in hit.snippet)


# --- one user's rows only ------------------------------------------------------------------------


async def test_another_users_rows_are_never_found(
    store: PostgresStore, search: ThreadSearch
) -> None:
    mine, _ = await thread_with(store, ALICE, "shared words here", title="shared title")
    await thread_with(store, BOB, "shared words here", title="shared title")
    for q in ("shared", "shared words", "words here", "titl"):
        page = await search.search("alice", q)
        assert page.hits and {h.thread_id for h in page.hits} == {mine}, q
    assert (await search.search("carol", "shared")).hits == []


async def test_row_level_security_alone_keeps_users_apart(
    app_role_url: str,
    store: PostgresStore,
    test_settings: Settings,
) -> None:
    """Through the app's role (subject to the policies): the statement finds the user's rows;
    and with its own ``user_id`` filter defeated (the gate names alice, the filter bob) the
    policy alone still shows nothing of bob's."""
    await thread_with(store, ALICE, "common ground")
    bobs, _ = await thread_with(store, BOB, "common ground")
    pool = await open_pool(app_role_url, test_settings)
    try:
        role_store = PostgresStore(pool)
        assert await role_store.row_security_enforced()
        page = await ThreadSearch(pool).search("bob", "common")
        assert {h.thread_id for h in page.hits} == {bobs}
        crossed = SQL_SEARCH.replace("WHERE user_id = $1 AND", "WHERE user_id = $8 AND")
        async with role_store.connection() as conn:
            rows = await conn.fetch(crossed, "alice", "'common'", 10, None, None, None, "", "bob")
        assert rows == []
    finally:
        await pool.close()


# --- ranking, prefixes, syntax ---------------------------------------------------------------


async def test_more_occurrences_rank_higher(store: PostgresStore, search: ThreadSearch) -> None:
    _, (once,) = await thread_with(store, ALICE, "a kettle on a stove")
    _, (thrice,) = await thread_with(store, ALICE, "kettle kettle kettle")
    page = await search.search("alice", "kettle")
    assert [h.item_id for h in page.hits] == [thrice, once]
    assert page.hits[0].rank > page.hits[1].rank


async def test_the_word_being_typed_matches_as_a_prefix(
    store: PostgresStore, search: ThreadSearch
) -> None:
    await thread_with(store, ALICE, "photosynthesis in plants")
    assert len((await search.search("alice", "photo")).hits) == 1
    assert len((await search.search("alice", "plants photon")).hits) == 0
    assert len((await search.search("alice", "in pla")).hits) == 1
    # A finished word (followed by a space) is matched whole.
    assert (await search.search("alice", "photo ")).hits == []
    assert len((await search.search("alice", "photosynthesis ")).hits) == 1


async def test_web_search_syntax_works_and_is_never_an_error(
    store: PostgresStore, search: ThreadSearch
) -> None:
    _, (red,) = await thread_with(store, ALICE, "the red fox jumps")
    _, (blue,) = await thread_with(store, ALICE, "the blue fox sleeps")
    assert {h.item_id for h in (await search.search("alice", "fox -red ")).hits} == {blue}
    assert {h.item_id for h in (await search.search("alice", '"red fox" ')).hits} == {red}
    assert {h.item_id for h in (await search.search("alice", '"fox red" ')).hits} == set()
    assert {h.item_id for h in (await search.search("alice", "red or blue ")).hits} == {
        red,
        blue,
    }
    for hostile in (
        "&",
        "!",
        "a & | b",
        "'",
        "\\",
        "):*",
        "fox:*",
        "(((",
        "'fox':* & !",
        "<->",
        "<2>",
        '"',
        "-",
        "or",
        "*",
        "a:b:c",
        "fo\\'o",
    ):
        page = await search.search("alice", hostile)
        assert isinstance(page, SearchPage), hostile


# --- keyset pages ------------------------------------------------------------------------


async def test_pages_cover_every_match_once_in_order(
    store: PostgresStore, search: ThreadSearch
) -> None:
    expected = set()
    for n in range(12):
        tid, ids = await thread_with(
            store, ALICE, "walrus " * (1 + n % 3), "walrus", title="walrus" if n % 4 == 0 else None
        )
        expected |= {(tid, i) for i in ids}
        if n % 4 == 0:
            expected.add((tid, None))
    seen: list[tuple[str, str | None]] = []
    ranks: list[float] = []
    after = None
    pages = 0
    while True:
        page = await search.search("alice", "walrus", limit=5, after=after)
        pages += 1
        seen += found(page)
        ranks += [h.rank for h in page.hits]
        after = page.next_cursor
        if after is None:
            break
    assert len(seen) == len(set(seen)) == len(expected) == 27
    assert set(seen) == expected
    assert ranks == sorted(ranks, reverse=True)
    assert pages == 6
    # The cursor of a full page goes to the same place every time.
    first = await search.search("alice", "walrus", limit=5)
    assert first.next_cursor is not None
    again = await search.search("alice", "walrus", limit=5, after=first.next_cursor)
    assert found(again) == seen[5:10]


async def test_the_limit_is_bounded(store: PostgresStore, search: ThreadSearch) -> None:
    await thread_with(store, ALICE, "bounded")
    for bad in (0, -1, MAX_LIMIT + 1, True):
        with pytest.raises(InvalidInputError) as err:
            await search.search("alice", "bounded", limit=bad)
        assert err.value.field == "limit"
    assert len((await search.search("alice", "bounded", limit=MAX_LIMIT)).hits) == 1


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "!!!!",
        "x" * 200,
        "é",
        Cursor(0.5, 1, 3).encode() + "$",
        *(
            raw(text)
            for text in (
                "not json",
                "[]",
                "[1,2,3,4]",
                '["a",1,2]',
                "[1,2,3]",  # kind 2
                "[1,1,-1]",
                "[1,1,1.5]",
                "[true,1,1]",
                "[NaN,1,1]",
                "[1e999,1,1]",  # infinite
                "[1,1,99999999999999999999999]",  # seq beyond bigint
                "[1,1,null]",
                '{"rank":1}',
            )
        ),
    ],
)
async def test_a_cursor_not_from_a_page_is_refused(search: ThreadSearch, cursor: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        await search.search("alice", "anything", after=cursor)
    assert err.value.field == "after"


def test_cursors_round_trip_exactly() -> None:
    for c in (Cursor(0.0607927106320858, 1, 42), Cursor(1e-30, 0, 0), Cursor(1.0, 1, 2**63 - 1)):
        assert Cursor.decode(c.encode()) == c


# --- bad text ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q", [None, "", " ", "\t\n", "x" * (MAX_QUERY_CHARS + 1), "nul\x00here", "half \ud800"]
)
async def test_bad_text_is_refused_before_the_database(search: ThreadSearch, q: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        await search.search("alice", q)
    assert err.value.field == "q"


def test_query_parts() -> None:
    assert parse_query("red fox").prefix == "'fox':*"
    assert parse_query("red fox").text == "red "
    assert parse_query("red fox ").prefix is None
    assert parse_query("'; DROP TABLE x; --").prefix is None
    assert parse_query("naïve café").prefix == "'café':*"
    assert segments("a \x01b\x02 c") == [
        *segments("a "),
        *[s for s in segments("\x01b\x02")],
        *segments(" c"),
    ]


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(q=st.text(min_size=1, max_size=MAX_QUERY_CHARS))
async def test_any_text_is_an_answer_or_a_400_never_a_database_error(
    search: ThreadSearch, q: str
) -> None:
    """websearch_to_tsquery and the prefix term take any text the checks let through."""
    try:
        page = await search.search("alice", q, limit=3)
    except InvalidInputError:
        return
    assert page.hits == []


async def test_the_longest_text_is_answered(store: PostgresStore, search: ThreadSearch) -> None:
    await thread_with(store, ALICE, "needle")
    long = ("needle " + "x" * 40 + " ")[:MAX_QUERY_CHARS]
    assert (await search.search("alice", long)).hits == []
    many = ("needle or " * 40)[:MAX_QUERY_CHARS]
    assert len((await search.search("alice", many)).hits) == 1


# --- the configuration setting -------------------------------------------------------------


async def test_the_language_setting_stems_words_and_an_unknown_one_stops_startup(
    database_url: str, store: PostgresStore, test_settings: Settings
) -> None:
    english = test_settings.model_copy(update={"search_text_config": "english"})
    pool = await open_pool(database_url, english)
    try:
        en_store = PostgresStore(pool)
        await thread_with(en_store, ALICE, "the runners were running")
        assert len((await ThreadSearch(pool).search("alice", "runs ")).hits) == 1
        # 'simple' (the default) keeps words as written.
        assert (await ThreadSearch(store.pool).search("alice", "runs ")).hits == []
        async with en_store.connection() as conn:
            await check_search_config(conn, "english")
            with pytest.raises(ConfigurationError, match="SEARCH_TEXT_CONFIG='klingon'"):
                await check_search_config(conn, "klingon")
    finally:
        await pool.close()
    with pytest.raises(ValueError):
        Settings(search_text_config="english; DROP")


async def test_a_rare_word_is_found_through_the_gin_indexes(
    store: PostgresStore, search: ThreadSearch
) -> None:
    """Among many rows of the user and of others, a rare word is read from the GIN indexes, not
    by scanning the user's rows (bench/search_bench.py measures it on 1,000,000 items)."""
    await thread_with(store, ALICE, "zeppelin", title="zeppelin")
    owner = "CASE WHEN n % 10 = 0 THEN 'alice' ELSE 'user' || n % 10 END"
    async with store.connection() as conn:
        await conn.execute(
            "INSERT INTO chatkit_threads (user_id, id, created_at, title, data) "
            f"SELECT {owner}, 'bulk' || n, now(), 'bulk title ' || n, '{{}}' "
            "FROM generate_series(1, 10000) n"
        )
        await conn.execute(
            "INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data) "
            f"SELECT {owner}, 'bulk' || n, 'i' || n, now(), 'user_message', "
            "jsonb_build_object('content', jsonb_build_array(jsonb_build_object("
            "'type', 'input_text', 'text', 'common words ' || n))) "
            "FROM generate_series(1, 10000) n"
        )
        # As autovacuum would: the bulk rows leave the GIN indexes' pending lists.
        await conn.execute("VACUUM ANALYZE chatkit_threads, chatkit_items")
        await conn.execute(SQL_BEGIN_CUSTOM)  # as ThreadSearch plans it
        query = await conn.fetchval(SQL_QUERY, "zeppelin", None)
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                f"EXPLAIN {SQL_SEARCH}", "alice", query, 10, None, None, None, ""
            )
        )
        await conn.execute("ROLLBACK")
    # GIN on (user_id, search_vector) (revision 0007), or on the vector alone without btree_gin
    for table in ("items", "threads"):
        assert re.search(
            rf"Bitmap Index Scan on ix_chatkit_{table}_(user_id_)?search_vector", plan
        ), plan
    assert len((await search.search("alice", "zeppelin")).hits) == 2


# --- the migration on a populated table --------------------------------------------------------


@pytest.fixture
async def scratch_db(pg_server: PgServer) -> AsyncIterator[str]:
    url = await pg_server.create_database("ckpg_search")
    yield url
    await pg_server.drop_database(url)


async def test_the_migration_fills_existing_rows(scratch_db: str, test_settings: Settings) -> None:
    await asyncio.to_thread(migrate, scratch_db, "0004")
    conn = await asyncpg.connect(PgServer.dsn(scratch_db))
    try:
        await conn.execute(
            "INSERT INTO chatkit_threads (user_id, id, created_at, title, data) "
            "SELECT 'u' || (n % 3), 't' || n, now(), 'title ' || n, '{}' "
            "FROM generate_series(1, 30) n"
        )
        await conn.execute(
            "INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data) "
            "SELECT 'u' || (n % 3), 't' || n, 'i' || k, now(), "
            "CASE WHEN k = 3 THEN 'hidden_context_item' ELSE 'user_message' END, "
            "jsonb_build_object('content', jsonb_build_array(jsonb_build_object("
            "'type', 'input_text', 'text', 'old word ' || n))) "
            "FROM generate_series(1, 30) n, generate_series(1, 3) k"
        )
    finally:
        await conn.close()
    await asyncio.to_thread(migrate, scratch_db)
    pool = await open_pool(scratch_db, test_settings)
    try:
        page = await ThreadSearch(pool).search("u1", "old ", limit=500)
        assert len(page.hits) == 20  # 10 threads of u1, 2 messages each (not the hidden one)
        assert len((await ThreadSearch(pool).search("u2", "title ")).hits) == 10
    finally:
        await pool.close()
