"""Export and erase of one user's data (app.chat.userdata) on a real PostgreSQL, with the example
task plugin's hooks: the archive holds everything in order with checked digests, erase removes
every row in every table and nothing of anyone else's, export after erase is empty, a dry run
counts exactly and removes nothing, memory stays one chunk per piece, hostile names stay inside
the archive, and a corrupt attachment is an error rather than a silently short file."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.chat.plugins import PluginSet, load_plugins
from app.chat.userdata import erase_user, export_archive
from app.files.export import FLUSH_BYTES
from app.files.store import CHUNK_SIZE
from app.pg.pool import ConnectionPool, open_pool
from app.pg.store import PostgresStore
from app.pg.userdata import PAGE_ROWS
from app.settings import Settings
from tests.harness.backends import TABLES
from tests.harness.userdata import (
    TASKS_PLUGIN,
    USER_TABLES,
    assert_empty,
    assert_matches,
    read_archive,
    row_counts,
    seed_user,
)


@pytest.fixture(scope="module")
async def upool(tasks_db: str, test_settings: Settings) -> AsyncIterator[ConnectionPool]:
    pool = await open_pool(tasks_db, test_settings)
    yield pool
    await pool.close()


@pytest.fixture
async def ustore(upool: ConnectionPool) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(upool)
    yield store
    async with store.connection() as conn:
        await conn.execute(f"TRUNCATE {TABLES}, chatkit_attachment_blobs, plugin_tasks CASCADE")


@pytest.fixture
def plugins() -> PluginSet:
    return load_plugins([TASKS_PLUGIN])


async def export_bytes(store: PostgresStore, plugins: PluginSet, user_id: str) -> bytes:
    return b"".join([p async for p in export_archive(store.pool, plugins, user_id)])


async def test_export_erase_export(ustore: PostgresStore, plugins: PluginSet) -> None:
    async with ustore.connection() as conn:
        alice = await seed_user(conn, "alice")
        await seed_user(conn, "bob", threads=2, file_sizes=(5,), tasks=("bob's task",))
        bob_before = await row_counts(conn, "bob")
    assert_matches(read_archive(await export_bytes(ustore, plugins, "alice")), alice)

    report = await erase_user(ustore.pool, plugins, "alice")
    assert report.groups["conversations"] == {
        "attachment_bytes": sum(len(d) for _, d in alice.files.values()),
        "chatkit_feedback": alice.feedback,
        "chatkit_attachment_blobs": 1 + 3,  # 10 bytes: one chunk; 2 chunks + 7 bytes: three
        "chatkit_attachments": alice.attachment_count,
        "chatkit_items": alice.item_count,
        "chatkit_threads": len(alice.threads),
    }
    assert report.groups["limits"] == {"chatkit_rate_limits": 1, "chatkit_stream_leases": 1}
    assert report.groups["runs"] == {"chatkit_run_events": 2, "chatkit_runs": 1}
    assert report.groups["plugin tasks"] == {"plugin_tasks": len(alice.tasks)}
    async with ustore.connection() as conn:
        assert set((await row_counts(conn, "alice")).values()) == {0}
        assert await row_counts(conn, "bob") == bob_before  # untouched

    assert_empty(read_archive(await export_bytes(ustore, plugins, "alice")), "alice")
    again = await erase_user(ustore.pool, plugins, "alice")  # idempotent
    assert again.rows == 0
    assert again.lines() == ["no data stored for user 'alice': nothing to delete"]


async def test_dry_run_counts_what_erase_removes_and_removes_nothing(
    ustore: PostgresStore, plugins: PluginSet
) -> None:
    async with ustore.connection() as conn:
        await seed_user(conn, "alice")
        before = await row_counts(conn, "alice")
    dry = await erase_user(ustore.pool, plugins, "alice", dry_run=True)
    async with ustore.connection() as conn:
        assert await row_counts(conn, "alice") == before
    real = await erase_user(ustore.pool, plugins, "alice")
    assert dry.groups == real.groups and dry.rows == real.rows == sum(before.values())
    assert dry.lines()[0] == "would delete for user 'alice':"
    assert real.lines()[-1] == f"deleted {real.rows} rows in all"


async def test_a_user_with_nothing_gets_an_empty_archive(
    ustore: PostgresStore, plugins: PluginSet
) -> None:
    async with ustore.connection() as conn:
        await seed_user(conn, "bob")
    archive = read_archive(await export_bytes(ustore, plugins, "nobody"))
    assert_empty(archive, "nobody")
    assert (await erase_user(ustore.pool, plugins, "nobody")).rows == 0


async def test_pages_keep_the_order_past_a_page(ustore: PostgresStore, plugins: PluginSet) -> None:
    """More threads and items than a page holds: keyset pages carry on where they stopped."""
    async with ustore.connection() as conn:
        alice = await seed_user(
            conn, "alice", threads=PAGE_ROWS + 3, items_per_thread=1, file_sizes=()
        )
        one = await seed_user(conn, "carol", threads=1, items_per_thread=2 * PAGE_ROWS + 1)
    assert_matches(read_archive(await export_bytes(ustore, plugins, "alice")), alice)
    assert_matches(read_archive(await export_bytes(ustore, plugins, "carol")), one)


async def test_pieces_are_bounded_by_a_chunk(ustore: PostgresStore, plugins: PluginSet) -> None:
    """A file of many chunks comes out as many pieces, none larger than a chunk plus the
    archive's headers and one flush of JSON lines: memory does not grow with the file."""
    size = 9 * CHUNK_SIZE + 1
    async with ustore.connection() as conn:
        alice = await seed_user(conn, "alice", file_sizes=(size,))
    pieces = [p async for p in export_archive(ustore.pool, plugins, "alice")]
    assert max(len(p) for p in pieces) <= CHUNK_SIZE + FLUSH_BYTES + 4096
    assert len(pieces) >= 10
    assert_matches(read_archive(b"".join(pieces)), alice)


async def test_hostile_names_stay_inside_the_archive(
    ustore: PostgresStore, plugins: PluginSet
) -> None:
    names = ("../../etc/passwd", "a\\b\x01c.txt", "..", "")
    async with ustore.connection() as conn:
        alice = await seed_user(
            conn, "alice", file_sizes=(3, 4, 5, 6), names=names, ids=("../x/y", "/abs", ".")
        )
    archive = read_archive(await export_bytes(ustore, plugins, "alice"))
    assert_matches(archive, alice)
    for name in archive.zip.namelist():
        parts = name.split("/")
        assert (
            ".." not in parts and "" not in parts and "\\" not in name and not name.startswith("/")
        )


async def test_a_missing_chunk_fails_the_export(ustore: PostgresStore, plugins: PluginSet) -> None:
    async with ustore.connection() as conn:
        await seed_user(conn, "alice", file_sizes=(3 * CHUNK_SIZE,))
        await conn.execute(
            "DELETE FROM chatkit_attachment_blobs WHERE user_id = 'alice' AND chunk_no = 1"
        )
    with pytest.raises(RuntimeError, match="has 262144 bytes stored, not 786432"):
        await export_bytes(ustore, plugins, "alice")


async def test_a_failing_plugin_hook_rolls_back_its_group_only(
    ustore: PostgresStore,
) -> None:
    """A plugin whose erase fails: the chatkit_ groups before it are gone, its own table is
    whole (its transaction rolled back), and the error reaches the operator."""
    from app.chat.plugins import Plugin

    async def half_then_fail(conn: asyncpg.Connection, user_id: str) -> dict[str, int]:
        await conn.execute("DELETE FROM plugin_tasks WHERE user_id = $1", user_id)
        raise RuntimeError("plugin broke")

    broken = PluginSet((Plugin(name="broken", erase_user=half_then_fail),))
    async with ustore.connection() as conn:
        await seed_user(conn, "alice")
    with pytest.raises(RuntimeError, match="plugin broke"):
        await erase_user(ustore.pool, broken, "alice")
    async with ustore.connection() as conn:
        left = await row_counts(conn, "alice")
    assert left == {**dict.fromkeys(USER_TABLES, 0), "plugin_tasks": 2}


async def test_erase_works_through_the_apps_role_under_row_level_security(
    ustore: PostgresStore, plugins: PluginSet, tasks_db: str, test_settings: Settings
) -> None:
    """The operator may run it with the app's role: each transaction acts for the one user."""
    async with ustore.connection() as conn:
        alice = await seed_user(conn, "alice")
        await seed_user(conn, "bob")
        bob = await row_counts(conn, "bob")
        role = "ckpg_userdata_app"
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        # A password: the containerised server authenticates by password, not trust.
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'app-role-secret'")
        await conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
        )
    from sqlalchemy.engine import make_url

    as_role = make_url(tasks_db).set(username=role, password="app-role-secret")
    url = as_role.render_as_string(hide_password=False)
    pool = await open_pool(url, test_settings)
    try:
        app_store = PostgresStore(pool)
        assert await app_store.row_security_enforced()
        assert_matches(read_archive(await export_bytes(app_store, plugins, "alice")), alice)
        report = await erase_user(app_store.pool, plugins, "alice")
        assert report.rows > 0
    finally:
        await pool.close()
        async with ustore.connection() as conn:
            await conn.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")
    async with ustore.connection() as conn:
        assert set((await row_counts(conn, "alice")).values()) == {0}
        assert await row_counts(conn, "bob") == bob
