"""Per-user limits kept in PostgreSQL: request budgets and leases of streaming replies.

Every backend process consults the same rows (app.pg.limits), so the limits hold however many
processes serve. Both tables get the row-level security policy of revision 0003.

Both are UNLOGGED: their rows are short-lived counters and claims, written on every request,
and without WAL a transaction touching only them commits without waiting for a disk flush.
PostgreSQL empties them after a crash and does not copy them to standbys; both only lift the
limits for a moment.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("chatkit_rate_limits", "chatkit_stream_leases")
POLICY = "chatkit_user_isolation"
USER_MATCHES = "user_id = current_setting('app.user_id', true)"


def upgrade() -> None:
    op.create_table(
        "chatkit_rate_limits",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("tat", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_chatkit_rate_limits")),
        prefixes=["UNLOGGED"],
    )
    op.create_table(
        "chatkit_stream_leases",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("thread_id", sa.Text(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("user_id", "id", name=op.f("pk_chatkit_stream_leases")),
        sa.UniqueConstraint(
            "user_id", "thread_id", name=op.f("uq_chatkit_stream_leases_user_id_thread_id")
        ),
        prefixes=["UNLOGGED"],
    )
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY {POLICY} ON {table} FOR ALL "
            f"USING ({USER_MATCHES}) WITH CHECK ({USER_MATCHES})"
        )
    op.execute(TAKE_STREAM_LEASE)


# Taking a lease is one call (one round trip, one short implicit transaction) instead of a
# transaction of several statements. It runs with the caller's rights, so row-level security
# applies; it sets app.user_id itself first. The advisory lock orders every taker of one
# user's leases, in any process, until the call's transaction ends.
TAKE_STREAM_LEASE = """
CREATE FUNCTION chatkit_take_stream_lease(
    p_user text, p_lease text, p_thread text, p_limit integer, p_ttl double precision
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    live bigint;
    busy boolean;
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    PERFORM pg_advisory_xact_lock(hashtextextended('chatkit-pg.leases:' || p_user, 0));
    DELETE FROM chatkit_stream_leases WHERE user_id = p_user AND expires_at < now();
    SELECT count(*), coalesce(bool_or(thread_id = p_thread), false) INTO live, busy
        FROM chatkit_stream_leases WHERE user_id = p_user;
    IF busy THEN
        RETURN 'busy';
    END IF;
    IF p_limit > 0 AND live >= p_limit THEN
        RETURN 'full';
    END IF;
    -- A new thread's reply may claim the thread (an UPDATE, without this lock) meanwhile.
    INSERT INTO chatkit_stream_leases (user_id, id, thread_id, expires_at)
        VALUES (p_user, p_lease, p_thread, now() + make_interval(secs => p_ttl))
        ON CONFLICT (user_id, thread_id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'busy';
    END IF;
    RETURN 'taken';
END
$$
"""


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION IF EXISTS chatkit_take_stream_lease(text, text, text, integer, "
        "double precision)"
    )
    op.drop_table("chatkit_stream_leases")
    op.drop_table("chatkit_rate_limits")
