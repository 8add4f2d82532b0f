"""Two users' rows, and what the owner sees of them: the row-level-security tests' set-up, on
one node (tests/pg/test_rls.py) and on a Citus cluster (tests/citus/test_citus_rls.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from chatkit.types import AttachmentCreateParams
from sqlalchemy.ext.asyncio import AsyncEngine

from app.background import TaskRegistry
from app.files.store import PgAttachmentStore
from app.ids import new_id
from app.pg.limits import Limits
from app.pg.runlog import RunLog
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness import factories as f
from tests.harness.backends import CONTENT_TABLES

ALICE = {"user_id": "alice"}
BOB = {"user_id": "bob"}


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def counts_by_user(
    engine: AsyncEngine, tables: tuple[str, ...] = CONTENT_TABLES
) -> dict[str, dict[str, int]]:
    """What the owner (no row-level security) sees: rows per user in every table."""
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        out: dict[str, dict[str, int]] = {}
        for table in tables:
            rows = await raw.fetch(f"SELECT user_id, count(*) FROM {table} GROUP BY user_id")
            out[table] = {r[0]: r[1] for r in rows}
    return out


async def seed_two_users(store: PostgresStore, config: Settings) -> None:
    """Each user: a thread with two messages and feedback, an uploaded file, a counted request
    and a stream lease."""
    files = PgAttachmentStore(store.pool, store, config)
    for ctx in (ALICE, BOB):
        thread = f.thread()
        await store.save_thread(thread, ctx)
        items = [f.user_message(thread.id, "x"), f.user_message(thread.id, "y")]
        for item in items:
            await store.add_thread_item(thread.id, item, ctx)
        await store.save_feedback(thread.id, [items[0].id], "negative", ctx)
        pending = await files.create_attachment(
            AttachmentCreateParams(name="n.txt", size=2, mime_type="text/plain"), ctx
        )
        await files.upload_to(ctx["user_id"], pending.id, body(b"hi"), "text/plain")
        # app.pg.limits' rows: a request counted, a stream lease taken (never released here).
        limits = Limits(
            store.pool, config.model_copy(update={"rate_limit_per_minute": 60}), TaskRegistry()
        )
        await limits.admit(ctx["user_id"])
        await limits.lease(ctx["user_id"], thread.id)
        # app.pg.runlog's rows: a resumable reply with one event logged.
        runlog = RunLog(store.pool, retention_seconds=600)
        run_id = new_id("run")
        await runlog.start(ctx["user_id"], run_id, thread.id)
        assert await runlog.append(ctx["user_id"], run_id, 1, ["data: {}"], "running") is False
