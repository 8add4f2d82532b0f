"""``python -m app prune [--dry-run]``: delete what the service no longer needs.

* **Orphan uploads**: attachments never attached to a message (``thread_id IS NULL``) created
  more than ``UPLOAD_ORPHAN_HOURS`` ago, finished or not, with their bytes.
* **Expired threads**, only when ``RETENTION_DAYS`` is set: threads with no activity for that
  long (created, updated and newest item all older than the cut-off), with their items,
  feedback, attachments and bytes (``ON DELETE CASCADE``).

Neither takes a file that a message still shows: an attachment belongs to the thread that first
sends it (app.pg.store refuses it in any other thread and never unsends it), so one without a
thread is in no message, and one with a thread goes only with that thread.

Deletion runs in small batches, each its own short transaction whose rows are locked with
``SKIP LOCKED``, so it can run beside live traffic and from several replicas at once. It
reports what it removed; ``--dry-run`` only counts. Schedule it (cron, a systemd timer, a
Kubernetes CronJob) every hour or so; it is idempotent.

It works across all users, so it must connect as the owner of the tables (the role that runs
the migrations), which row-level security does not restrict (docs/rls.md): through the app's
own role, which sees no rows without ``app.user_id``, it would silently find nothing, so it
refuses to run there instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import ConfigurationError
from app.pg.citus import CITUS_INSTALLED
from app.pg.engine import aresolve_database_url, create_engine
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

BATCH = 200

# Orphans: never attached to a message, created before the cut-off ($1).
# Idle threads: the thread and every item in it older than the cut-off ($1).
# Literal SQL (no interpolation); values are always bound.
SQL_COUNT_ORPHANS = (
    "SELECT count(*), coalesce(sum(size_bytes), 0) FROM chatkit_attachments WHERE thread_id "
    "IS NULL AND created_at < $1"
)
SQL_DELETE_ORPHANS = (
    "WITH victims AS (SELECT user_id, id FROM chatkit_attachments WHERE thread_id IS NULL AND "
    "created_at < $1 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED) DELETE FROM "
    "chatkit_attachments a USING victims v WHERE a.user_id = v.user_id AND a.id = v.id "
    "RETURNING coalesce(a.size_bytes, 0)"
)
SQL_PICK_THREADS = (
    "SELECT t.user_id, t.id FROM chatkit_threads t WHERE t.created_at < $1 AND t.updated_at < "
    "$1 AND NOT EXISTS (SELECT 1 FROM chatkit_items i WHERE i.user_id = t.user_id AND "
    "i.thread_id = t.id AND i.created_at >= $1) ORDER BY t.created_at LIMIT $2 FOR UPDATE OF "
    "t SKIP LOCKED"
)
SQL_COUNT_DEPENDENTS = (
    "SELECT (SELECT count(*) FROM chatkit_items x JOIN unnest($1::text[], $2::text[]) AS "
    "v(user_id, id) ON x.user_id = v.user_id AND x.thread_id = v.id), (SELECT count(*) FROM "
    "chatkit_feedback x JOIN unnest($1::text[], $2::text[]) AS v(user_id, id) ON x.user_id = "
    "v.user_id AND x.thread_id = v.id), (SELECT count(*) FROM chatkit_attachments x JOIN "
    "unnest($1::text[], $2::text[]) AS v(user_id, id) ON x.user_id = v.user_id AND "
    "x.thread_id = v.id), (SELECT coalesce(sum(x.size_bytes), 0) FROM chatkit_attachments x "
    "JOIN unnest($1::text[], $2::text[]) AS v(user_id, id) ON x.user_id = v.user_id AND "
    "x.thread_id = v.id)"
)
SQL_COUNT_IDLE = (
    "WITH v AS (SELECT t.user_id, t.id FROM chatkit_threads t WHERE t.created_at < $1 AND "
    "t.updated_at < $1 AND NOT EXISTS (SELECT 1 FROM chatkit_items i WHERE i.user_id = "
    "t.user_id AND i.thread_id = t.id AND i.created_at >= $1)) SELECT (SELECT count(*) FROM "
    "v), (SELECT count(*) FROM chatkit_items x JOIN v ON x.user_id = v.user_id AND "
    "x.thread_id = v.id), (SELECT count(*) FROM chatkit_feedback x JOIN v ON x.user_id = "
    "v.user_id AND x.thread_id = v.id), (SELECT count(*) FROM chatkit_attachments x JOIN v ON "
    "x.user_id = v.user_id AND x.thread_id = v.id), (SELECT coalesce(sum(x.size_bytes), 0) "
    "FROM chatkit_attachments x JOIN v ON x.user_id = v.user_id AND x.thread_id = v.id)"
)
SQL_ROW_SECURITY_ACTIVE = (
    "SELECT bool_or(row_security_active(t)) FROM unnest(ARRAY['chatkit_threads', "
    "'chatkit_items', 'chatkit_attachments', 'chatkit_attachment_blobs', "
    "'chatkit_feedback']::regclass[]) AS t"
)
SQL_DELETE_THREADS = (
    "DELETE FROM chatkit_threads t USING unnest($1::text[], $2::text[]) AS v(user_id, id) "
    "WHERE t.user_id = v.user_id AND t.id = v.id"
)


@dataclass
class PruneReport:
    dry_run: bool
    orphan_cutoff: str
    retention_cutoff: str | None
    orphan_attachments: int = 0
    orphan_bytes: int = 0
    threads: int = 0
    items: int = 0
    feedback: int = 0
    thread_attachments: int = 0
    thread_attachment_bytes: int = 0

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        text = (
            f"{verb} {self.orphan_attachments} unattached upload(s) "
            f"({self.orphan_bytes} bytes) created before {self.orphan_cutoff}"
        )
        if self.retention_cutoff is None:
            return text + "; thread retention is off (RETENTION_DAYS unset)"
        return text + (
            f"; {verb} {self.threads} thread(s) idle since before {self.retention_cutoff} with "
            f"{self.items} item(s), {self.feedback} feedback row(s) and "
            f"{self.thread_attachments} attachment(s) ({self.thread_attachment_bytes} bytes)"
        )


async def prune(
    engine: AsyncEngine,
    settings: Settings,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    batch: int = BATCH,
) -> PruneReport:
    now = now or datetime.now(UTC)
    orphan_cutoff = now - timedelta(hours=settings.upload_orphan_hours)
    retention_cutoff = (
        now - timedelta(days=settings.retention_days) if settings.retention_days else None
    )
    report = PruneReport(
        dry_run=dry_run,
        orphan_cutoff=orphan_cutoff.isoformat(),
        retention_cutoff=retention_cutoff.isoformat() if retention_cutoff else None,
    )
    async with engine.connect() as sa_conn:
        conn: asyncpg.Connection = (await sa_conn.get_raw_connection()).driver_connection
        if await conn.fetchval(SQL_ROW_SECURITY_ACTIVE):
            raise ConfigurationError(
                "prune must connect as the owner of the chatkit_ tables (the role that runs the "
                "migrations): row-level security hides every row from this role. Run it with "
                "DATABASE_URL set to the owner's URL (see docs/rls.md)."
            )
        if not dry_run and await conn.fetchval(CITUS_INSTALLED):
            # Its batches lock rows FOR UPDATE SKIP LOCKED across users, which Citus refuses in a
            # multi-shard query; counting (the dry run) works.
            raise ConfigurationError(
                "prune cannot delete on a Citus cluster yet; --dry-run counts (see docs/citus.md)"
            )
        # Expired threads first: their attachments then count with the thread, not as orphans.
        if retention_cutoff is not None:
            await _prune_threads(conn, report, retention_cutoff, dry_run, batch)
        await _prune_orphans(conn, report, orphan_cutoff, dry_run, batch)
    return report


async def _prune_threads(
    conn: asyncpg.Connection, report: PruneReport, cutoff: datetime, dry_run: bool, batch: int
) -> None:
    if dry_run:
        threads, items, feedback, atts, nbytes = await conn.fetchrow(SQL_COUNT_IDLE, cutoff)
        report.threads, report.items, report.feedback = threads, items, feedback
        report.thread_attachments, report.thread_attachment_bytes = atts, int(nbytes)
        return
    while True:
        async with conn.transaction():
            rows = await conn.fetch(SQL_PICK_THREADS, cutoff, batch)
            if not rows:
                return
            users = [r[0] for r in rows]
            ids = [r[1] for r in rows]
            items, feedback, atts, nbytes = await conn.fetchrow(SQL_COUNT_DEPENDENTS, users, ids)
            await conn.execute(SQL_DELETE_THREADS, users, ids)
        report.threads += len(rows)
        report.items += items
        report.feedback += feedback
        report.thread_attachments += atts
        report.thread_attachment_bytes += int(nbytes)
        if len(rows) < batch:
            return


async def _prune_orphans(
    conn: asyncpg.Connection, report: PruneReport, cutoff: datetime, dry_run: bool, batch: int
) -> None:
    if dry_run:
        count, nbytes = await conn.fetchrow(SQL_COUNT_ORPHANS, cutoff)
        report.orphan_attachments, report.orphan_bytes = count, int(nbytes)
        return
    while True:
        rows = await conn.fetch(SQL_DELETE_ORPHANS, cutoff, batch)
        report.orphan_attachments += len(rows)
        report.orphan_bytes += sum(int(r[0]) for r in rows)
        if len(rows) < batch:
            return


async def run_prune(settings: Settings, *, dry_run: bool) -> PruneReport:
    url = await aresolve_database_url(settings)
    engine = create_engine(url, settings)
    try:
        return await prune(engine, settings, dry_run=dry_run)
    finally:
        await engine.dispose()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="only count what would go")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_prune(args: argparse.Namespace) -> int:
    try:
        report = asyncio.run(run_prune(get_settings(), dry_run=args.dry_run))
    except ConfigurationError as exc:
        print(f"prune: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(report)) if args.json else report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m app.cli.prune", description=__doc__)
    add_arguments(parser)
    return cmd_prune(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
