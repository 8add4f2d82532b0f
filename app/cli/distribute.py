"""``python -m app distribute``: the chatkit_ tables as Citus distributed tables (docs/citus.md).

Run after ``alembic upgrade head`` (``python -m app migrate``) against the coordinator, with the
owner's credentials. Every table holding users' content is hash-distributed by ``user_id`` and
co-located with ``chatkit_threads``: one user's thread, items, attachments, their bytes and
feedback share a shard, so each store statement (always filtered by one user) routes to one
worker, and the foreign keys and ON DELETE CASCADE hold inside that shard. Parents come before
the tables that reference them, as Citus requires.

The resumable replies' log (``chatkit_runs``, ``chatkit_run_events``, migration 0006) is
distributed the same way, and its functions (``chatkit_run_append`` and the others, each taking
the user as its first argument) are *distributed functions* co-located with it: Citus delegates
a call to the worker holding that user's shard, which runs the whole function there, its
``set_config`` and row-level security included, in one round trip from the coordinator. So is
``chatkit_add_item`` (migration 0009), the store's item insert of every turn.

The limiter's tables (``chatkit_rate_limits``, ``chatkit_stream_leases``) stay ordinary tables
on the coordinator, on purpose: every request checks them through the coordinator it is served
by anyway; the coordinator's row lock and advisory lock keep the exact budget and the one lease
per thread without a distributed transaction; their statements (``now()`` in an upsert's
``DO UPDATE``, a PL/pgSQL function taking an advisory lock) run there unchanged; and they are
tiny (a row per active user, a row per running stream) and UNLOGGED.

Idempotent: tables already distributed this way are left alone and said so; a table distributed
some other way is an error, not something to undo silently.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass, field

import asyncpg
from sqlalchemy.engine import make_url

from app.pg.engine import resolve_database_url
from app.settings import get_settings

DISTRIBUTION_COLUMN = "user_id"
# Parents first: a distributed table's foreign keys must point at tables distributed before it.
DISTRIBUTED = (
    "chatkit_threads",
    "chatkit_items",
    "chatkit_attachments",
    "chatkit_attachment_blobs",
    "chatkit_feedback",
    "chatkit_runs",
    "chatkit_run_events",
)
# The run log's functions (app.pg.runlog) and the store's add_thread_item on a cluster
# (app.pg.sql.CITUS_CALLS), delegated to the worker of their first argument's shard: ``p_user``.
DISTRIBUTED_FUNCTIONS = (
    "chatkit_add_item(text, text, text, timestamp with time zone, text, jsonb)",
    "chatkit_run_start(text, text, text)",
    "chatkit_run_open(text, text, text)",
    "chatkit_run_append(text, text, integer, text[], text)",
    "chatkit_run_read(text, text, integer, integer, double precision)",
    "chatkit_run_cancel(text, text, double precision)",
    "chatkit_run_abandon(text, text, double precision)",
    "chatkit_run_of_thread(text, text)",
    "chatkit_run_set_thread(text, text, text)",
)
FUNCTION_ARGUMENT = "p_user"
# Kept on the coordinator: the limiter's rows.
COORDINATOR_LOCAL = (
    "chatkit_rate_limits",
    "chatkit_stream_leases",
)

SQL_HAS_CITUS = "SELECT extversion FROM pg_extension WHERE extname = 'citus'"
SQL_EXISTING = "SELECT t FROM unnest($1::text[]) t WHERE to_regclass(t) IS NULL"
SQL_DISTRIBUTION = (
    "SELECT logicalrelid::text, partmethod::text, "
    "column_to_column_name(logicalrelid, partkey), colocationid "
    "FROM pg_dist_partition WHERE logicalrelid::text = ANY($1::text[])"
)


class DistributeError(Exception):
    """The database cannot be distributed as it is; the message says why and what to do."""


@dataclass
class Report:
    distributed: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    delegated: list[str] = field(default_factory=list)
    # Functions of a later revision than the database's: ``migrate`` then ``distribute`` again.
    not_yet: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"distributed by {DISTRIBUTION_COLUMN}: {t}" for t in self.distributed]
        out += [f"already distributed by {DISTRIBUTION_COLUMN}: {t}" for t in self.already]
        out.append(f"functions delegated by {FUNCTION_ARGUMENT}: {len(self.delegated)}")
        if self.not_yet:
            out.append(
                "not in this database's revision yet (run migrate, then distribute again): "
                + ", ".join(f.split("(", 1)[0] for f in self.not_yet)
            )
        out.append(f"kept on the coordinator (limits): {', '.join(COORDINATOR_LOCAL)}")
        if not self.distributed:
            out.append("nothing to do: every table was already distributed")
        return out


async def distribute(dsn: str) -> Report:
    """Distribute the chatkit_ tables of the database at ``dsn`` (plain asyncpg form)."""
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval(SQL_HAS_CITUS) is None:
            raise DistributeError(
                "the citus extension is not installed in this database: run CREATE EXTENSION "
                "citus (on the coordinator and every worker) and add the workers first"
            )
        missing = [r[0] for r in await conn.fetch(SQL_EXISTING, list(DISTRIBUTED))]
        if missing:
            raise DistributeError(
                f"table {missing[0]} does not exist: run `python -m app migrate` first"
            )
        report = Report()
        # The search vectors are kept by row triggers (migration 0005) that read only the row
        # itself and immutable text-search functions: safe on a shard, so Citus is told to
        # create them there (it refuses a table with triggers otherwise).
        await conn.execute("SET citus.enable_unsafe_triggers TO on")
        for table in DISTRIBUTED:
            current = await _distribution(conn)
            if table in current:
                method, column, group = current[table]
                threads_group = current.get(DISTRIBUTED[0], (None, None, None))[2]
                if method != "h" or column != DISTRIBUTION_COLUMN or group != threads_group:
                    raise DistributeError(
                        f"{table} is already distributed another way ({method}, {column}); "
                        f"undistribute it (SELECT undistribute_table('{table}')) and run again"
                    )
                report.already.append(table)
                continue
            colocate = "none" if table == DISTRIBUTED[0] else DISTRIBUTED[0]
            await conn.execute(
                "SELECT create_distributed_table($1, $2, colocate_with => $3)",
                table,
                DISTRIBUTION_COLUMN,
                colocate,
            )
            report.distributed.append(table)
        for function in DISTRIBUTED_FUNCTIONS:
            if await conn.fetchval("SELECT to_regprocedure($1)", function) is None:
                report.not_yet.append(function)  # a database at an older revision
                continue
            # Idempotent: distributing a distributed function again only restates it.
            report.delegated.append(function)
            await conn.execute(
                "SELECT create_distributed_function($1, $2, colocate_with => $3)",
                function,
                FUNCTION_ARGUMENT,
                DISTRIBUTED[0],
            )
        return report
    finally:
        await conn.close()


async def _distribution(conn: asyncpg.Connection) -> dict[str, tuple[str, str | None, int]]:
    rows = await conn.fetch(SQL_DISTRIBUTION, list(DISTRIBUTED))
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def plain_dsn(url: str) -> str:
    """The libpq spelling of the app's SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def cmd_distribute(args: argparse.Namespace) -> int:
    settings = get_settings()
    if not settings.database_url:
        print(
            "cannot distribute: DATABASE_URL must name the Citus coordinator "
            "(the embedded PostgreSQL has no Citus)",
            file=sys.stderr,
        )
        return 2
    url = resolve_database_url(settings)
    try:
        report = asyncio.run(distribute(plain_dsn(url)))
    except DistributeError as exc:
        print(f"cannot distribute: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 0
