"""Per-user limits kept in PostgreSQL: request budgets and leases of streaming replies.

Every backend process consults the same rows (app.limits), so the limits hold however many
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


def downgrade() -> None:
    op.drop_table("chatkit_stream_leases")
    op.drop_table("chatkit_rate_limits")
