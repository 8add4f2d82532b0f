"""Search on a real Citus cluster (tests/harness/citus.py): the search vectors are kept by the
triggers on the shards (``python -m app distribute`` creates them there), a user finds their own
threads and never another's on the same shards, and the search statement is routed to one shard
(every table it reads is filtered by the user, the distribution column)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.engine import make_url

from app.cli.distribute import distribute, plain_dsn
from app.pg.pool import open_pool
from app.pg.search import HEADLINE_OPTIONS, SQL_QUERY, SQL_SEARCH, ThreadSearch, parse_query
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness import factories as f
from tests.harness.citus import WORKERS, CitusCluster, explain, single_shard, worker_fetch
from tests.harness.pg import migrate

pytestmark = pytest.mark.backends("citus")

ALICE = {"user_id": "alice"}
BOB = {"user_id": "bob"}


SEED = (
    ("alice-zebra", ALICE, "Animals", "the zebra crossing near the station"),
    ("alice-budget", ALICE, "Quarterly budget", "numbers for the next quarter"),
    ("bob-zebra", BOB, "Stripes", "a zebra in the zoo"),
)
# An item as the store writes it, for a database at an older revision than the store's code
# (whose item insert on a cluster is revision 0009's delegated function).
SQL_OLD_ITEM = (
    "INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data) "
    "VALUES ($1, $2, $3, $4, $5, $6::jsonb)"
)


async def seed(store: PostgresStore, *, raw_items: bool = False) -> dict[str, str]:
    """Alice and Bob each a thread about zebras; Alice one more about budgets."""
    threads: dict[str, str] = {}
    for name, ctx, title, text in SEED:
        thread = f.thread(title=title)
        await store.save_thread(thread, ctx)
        item = f.user_message(thread.id, text)
        if raw_items:
            async with store.pool.acquire() as conn:
                await conn.execute(
                    SQL_OLD_ITEM,
                    ctx["user_id"],
                    thread.id,
                    item.id,
                    item.created_at,
                    item.type,
                    item.model_dump_json(),
                )
        else:
            await store.add_thread_item(thread.id, item, ctx)
        threads[name] = thread.id
    return threads


async def test_a_user_finds_their_own_threads_on_the_shards(store: PostgresStore) -> None:
    threads = await seed(store)
    search = ThreadSearch(store.pool)

    zebra = await search.search("alice", "zebra ")
    assert [h.thread_id for h in zebra.hits] == [threads["alice-zebra"]]
    assert any(s.hit and s.text.lower() == "zebra" for s in zebra.hits[0].snippet)

    # As you type: a prefix; a title match.
    assert {h.thread_id for h in (await search.search("alice", "quart")).hits} == {
        threads["alice-budget"]
    }
    assert {h.thread_id for h in (await search.search("bob", "zeb")).hits} == {threads["bob-zebra"]}
    assert (await search.search("bob", "budget")).hits == []


async def test_the_search_statement_is_single_shard(store: PostgresStore) -> None:
    await seed(store)
    terms = parse_query("zebra")
    async with store.connection() as conn:
        query = await conn.fetchval(SQL_QUERY, terms.text, terms.prefix)
        args = ("alice", query, 21, None, None, None, HEADLINE_OPTIONS)
        plan = await explain(conn, SQL_SEARCH, args)
    assert single_shard(plan), plan


async def test_revision_0007_reaches_the_shards_of_a_distributed_cluster(
    citus: CitusCluster, test_settings: Settings
) -> None:
    """A cluster distributed at revision 0006 and then upgraded: btree_gin and the (user_id,
    search_vector) GIN indexes reach every shard through the coordinator, 0005's indexes go,
    and a search finds what it did."""
    url = await citus.create_database()
    await asyncio.to_thread(migrate, url, "0006")
    await distribute(plain_dsn(url))
    pool = await open_pool(url, test_settings)
    try:
        store = PostgresStore(pool)
        threads = await seed(store, raw_items=True)
        await asyncio.to_thread(migrate, url)
        await distribute(plain_dsn(url))  # the later revisions' functions, as docs/citus.md says
        database = make_url(url).database
        assert database is not None
        for worker in range(WORKERS):
            names = [
                r[0]
                for r in await worker_fetch(
                    citus,
                    worker,
                    database,
                    "SELECT indexname FROM pg_indexes WHERE indexname LIKE '%search_vector%'",
                )
            ]
            for table in ("items", "threads"):
                assert any(n.startswith(f"ix_chatkit_{table}_user_id_search_vector") for n in names)
                assert not any(n.startswith(f"ix_chatkit_{table}_search_vector") for n in names)
        zebra = await ThreadSearch(pool).search("alice", "zebra ")
        assert [h.thread_id for h in zebra.hits] == [threads["alice-zebra"]]
    finally:
        await pool.close()
