"""Search speed: the GIN indexes of the search vectors lead with ``user_id`` (``btree_gin``).

Revision 0005 indexed the vectors alone; a search of one user combined a word's GIN bitmap,
over every user's rows, with the user's whole primary-key range (BitmapAnd): for a word in a
few percent of a user's 100,000 messages that range scan alone read 100,000 index entries
(bench/search_bench.py, docs/search.md). A GIN index on ``(user_id, search_vector)`` answers
"this user's rows with these words" by itself. ``btree_gin`` (a contrib extension shipped with
PostgreSQL, trusted since PostgreSQL 13, so a database owner may create it) gives ``text`` a GIN
operator class.

The embedded development server (app.pg.embedded: the ``pgserver`` wheel) has no contrib
extensions: where ``btree_gin`` is not available this revision changes nothing and the
indexes of 0005 stay (searches are correct either way, only slower for words of middling
frequency).

Without locking writers for long, on a populated table, and idempotent: the new indexes are
built with CREATE INDEX CONCURRENTLY (autocommit), an invalid one left by an interrupted build
is dropped and built again, and the old index is dropped CONCURRENTLY only once the new one is
valid. On Citus the statements go through the coordinator, which creates the extension on the
workers and the indexes on every shard.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# new index: (table, the index of 0005 it replaces)
INDEXES = {
    "ix_chatkit_items_user_id_search_vector": ("chatkit_items", "ix_chatkit_items_search_vector"),
    "ix_chatkit_threads_user_id_search_vector": (
        "chatkit_threads",
        "ix_chatkit_threads_search_vector",
    ),
}
WHERE = "WHERE search_vector IS NOT NULL"


def btree_gin_available() -> bool:
    bind = op.get_bind()
    return bool(
        bind.execute(
            sa.text("SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'btree_gin')")
        ).scalar()
    )


def _valid(name: str) -> bool | None:
    """True or False for an index that exists (False: an interrupted build), None otherwise."""
    value = (
        op.get_bind()
        .execute(
            sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
            {"n": name},
        )
        .scalar()
    )
    return None if value is None else bool(value)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        if not btree_gin_available():
            return
        op.execute("CREATE EXTENSION IF NOT EXISTS btree_gin")
        for name, (table, old) in INDEXES.items():
            if _valid(name) is False:
                op.execute(f"DROP INDEX CONCURRENTLY {name}")
            op.execute(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} "
                f"USING gin (user_id, search_vector) {WHERE}"
            )
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {old}")


def downgrade() -> None:
    for name, (table, old) in INDEXES.items():
        op.execute(f"CREATE INDEX IF NOT EXISTS {old} ON {table} USING gin (search_vector) {WHERE}")
        op.execute(f"DROP INDEX IF EXISTS {name}")
