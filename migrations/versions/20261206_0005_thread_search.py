"""Full-text search over a user's threads: a ``search_vector`` on chatkit_threads (the title)
and chatkit_items (the text of user and assistant messages), kept by triggers, and GIN indexes.

How the vector is kept: a BEFORE trigger, not a generated column and not the store.

* A generated column needs an immutable expression, so the text-search configuration would be
  a constant of this migration and changing ``SEARCH_TEXT_CONFIG`` another migration; and
  adding a stored generated column rewrites the whole table under an ACCESS EXCLUSIVE lock.
* The store writing the column would put the indexing rules in every writer (the store's
  upserts, plugins, imports); the trigger covers every INSERT and every UPDATE of the indexed
  columns whoever runs it.

The trigger reads the configuration from ``chatkit_search_config()``: the connection's
``chatkit.search_config`` setting, which the app sets on each of its connections from
``SEARCH_TEXT_CONFIG`` (app.pg.engine.server_settings), ``simple`` where it is unset (psql, other
tools); the app checks at startup that the configuration exists (app.pg.search). Queries (app.pg.search) call the same function, so a vector and the queries against it
always use one configuration. Only ``user_message`` and ``assistant_message`` items get a
vector, from their ``input_text`` / ``output_text`` parts; hidden context, tool calls and
widgets never do. Titles are weighted A, messages D, so a title match ranks first.

Without locking writers for long, on a populated table:

1. the columns are added nullable without a default (a catalog change: the ACCESS EXCLUSIVE
   lock is held for milliseconds, the table is not rewritten); the functions and triggers are
   created, so from here on every write keeps its vector;
2. the existing rows are filled in batches of ``BATCH`` rows in primary-key order, each batch
   its own short transaction (autocommit), so writers wait at most for one batch's row locks;
3. the GIN indexes are built with CREATE INDEX CONCURRENTLY (autocommit), which lets writes go
   on. A build interrupted midway leaves an invalid index: it is dropped and built again.

Steps 2 and 3 commit as they go, so a migration interrupted there (or refused by
``DB_LOCK_TIMEOUT_MS`` or a deadlock with a writer in step 1) is simply run again: every step
is idempotent (IF NOT EXISTS, OR REPLACE, the backfill skips filled rows).

The GIN indexes hold the vectors alone (``btree_gin``, which could lead them with ``user_id``,
is a contrib extension the embedded development server lacks): PostgreSQL combines a word's
GIN bitmap with the ``user_id`` btree's (BitmapAnd) when that is cheaper than checking each match.
bench/search_bench.py measures this
migration on 1,000,000 items.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 5000
INDEXED_TYPES = "('user_message', 'assistant_message')"
TEXT_PARTS = """'$.content[*] ? (@.type == "input_text" || @.type == "output_text").text'"""

FUNCTIONS = (
    # The configuration of every vector and query; STABLE (it reads a setting), inlined.
    """
CREATE OR REPLACE FUNCTION chatkit_search_config() RETURNS regconfig LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(nullif(current_setting('chatkit.search_config', true), ''), 'simple')::regconfig
$$""",
    # An item's vector: the strings of its text parts, for user and assistant messages only.
    # One expression without sub-selects, so PostgreSQL inlines it into the trigger's.
    f"""
CREATE OR REPLACE FUNCTION chatkit_item_vector(kind text, data jsonb) RETURNS tsvector
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN kind IN {INDEXED_TYPES} THEN jsonb_to_tsvector(chatkit_search_config(),
        jsonb_path_query_array(data, {TEXT_PARTS}), '["string"]') END
$$""",
    # The same parts as text, for ts_headline (at query time, for a page's rows only); the
    # highlight marks app.pg.search puts around matches are removed from it beforehand.
    f"""
CREATE OR REPLACE FUNCTION chatkit_search_text(kind text, data jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN kind IN {INDEXED_TYPES} THEN coalesce((
        SELECT string_agg(translate(part #>> '{{}}', E'\\x01\\x02', ''), E'\\n')
        FROM jsonb_array_elements(jsonb_path_query_array(data, {TEXT_PARTS})) part
        WHERE jsonb_typeof(part) = 'string'), '') END
$$""",
    """
CREATE OR REPLACE FUNCTION chatkit_items_search_vector() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.search_vector := chatkit_item_vector(NEW.type, NEW.data);
    RETURN NEW;
END
$$""",
    """
CREATE OR REPLACE FUNCTION chatkit_threads_search_vector() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.search_vector := setweight(to_tsvector(chatkit_search_config(), NEW.title), 'A');
    RETURN NEW;
END
$$""",
)
TRIGGERS = (
    "CREATE OR REPLACE TRIGGER chatkit_items_search BEFORE INSERT OR UPDATE OF type, data "
    "ON chatkit_items FOR EACH ROW EXECUTE FUNCTION chatkit_items_search_vector()",
    "CREATE OR REPLACE TRIGGER chatkit_threads_search BEFORE INSERT OR UPDATE OF title "
    "ON chatkit_threads FOR EACH ROW EXECUTE FUNCTION chatkit_threads_search_vector()",
)
# Items before threads, in every step: an item's insert locks chatkit_items and then (its
# foreign key) chatkit_threads; taking them the other way round deadlocked against a writer
# (bench/search_bench.py, adding items during this migration).
INDEXES = {
    "ix_chatkit_items_search_vector": ("chatkit_items", "gin (search_vector)"),
    # A search's most recent matching messages, newest first (app.pg.search).
    "ix_chatkit_items_user_id_seq": ("chatkit_items", "btree (user_id, seq)"),
    "ix_chatkit_threads_search_vector": ("chatkit_threads", "gin (search_vector)"),
}
TABLES = ("chatkit_items", "chatkit_threads")

# One batch: the next BATCH keys after the last one done, filled, returning the last key.
BACKFILL = {
    "chatkit_items": (
        "WITH b AS (SELECT user_id, thread_id, id FROM chatkit_items "
        "WHERE (user_id, thread_id, id) > (:u, :t, :i) ORDER BY user_id, thread_id, id "
        f"LIMIT {BATCH}), "
        "u AS (UPDATE chatkit_items c SET search_vector = chatkit_item_vector(c.type, c.data) "
        "FROM b WHERE (c.user_id, c.thread_id, c.id) = (b.user_id, b.thread_id, b.id) "
        "AND c.search_vector IS NULL AND c.type IN " + INDEXED_TYPES + ") "
        "SELECT user_id, thread_id, id FROM b ORDER BY user_id DESC, thread_id DESC, id DESC "
        "LIMIT 1"
    ),
    "chatkit_threads": (
        "WITH b AS (SELECT user_id, '' AS thread_id, id FROM chatkit_threads "
        "WHERE (user_id, id) > (:u, :i) ORDER BY user_id, id "
        f"LIMIT {BATCH}), "
        "u AS (UPDATE chatkit_threads c SET search_vector = "
        "setweight(to_tsvector(chatkit_search_config(), c.title), 'A') "
        "FROM b WHERE (c.user_id, c.id) = (b.user_id, b.id) "
        "AND c.search_vector IS NULL AND c.title IS NOT NULL) "
        "SELECT user_id, thread_id, id FROM b ORDER BY user_id DESC, id DESC LIMIT 1"
    ),
}


def backfill(table: str) -> int:
    """Fill ``table``'s vectors batch by batch, each batch committed on its own; returns the
    number of batches. Call inside an autocommit block."""
    bind = op.get_bind()
    key: tuple[str, str, str] = ("", "", "")
    batches = 0
    while True:
        row = bind.execute(
            sa.text(BACKFILL[table]), {"u": key[0], "t": key[1], "i": key[2]}
        ).first()
        if row is None:
            return batches
        key = (row[0], row[1], row[2])
        batches += 1


def upgrade() -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS search_vector tsvector")
    for sql in (*FUNCTIONS, *TRIGGERS):  # TRIGGERS: items first too
        op.execute(sql)
    with op.get_context().autocommit_block():
        for table in TABLES:
            backfill(table)
        for name, (table, _) in INDEXES.items():
            valid = (
                op.get_bind()
                .execute(
                    sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
                    {"n": name},
                )
                .scalar()
            )
            if valid is False:  # left by an interrupted build
                op.execute(f"DROP INDEX CONCURRENTLY {name}")
            op.execute(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} "
                f"USING {INDEXES[name][1]} WHERE search_vector IS NOT NULL"
            )


def downgrade() -> None:
    for name in INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
    op.execute("DROP TRIGGER IF EXISTS chatkit_threads_search ON chatkit_threads")
    op.execute("DROP TRIGGER IF EXISTS chatkit_items_search ON chatkit_items")
    for table in TABLES:
        op.drop_column(table, "search_vector")
    op.execute("DROP FUNCTION IF EXISTS chatkit_threads_search_vector()")
    op.execute("DROP FUNCTION IF EXISTS chatkit_items_search_vector()")
    op.execute("DROP FUNCTION IF EXISTS chatkit_search_text(text, jsonb)")
    op.execute("DROP FUNCTION IF EXISTS chatkit_item_vector(text, jsonb)")
    op.execute("DROP FUNCTION IF EXISTS chatkit_search_config()")
