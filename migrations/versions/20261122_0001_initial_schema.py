"""Initial schema: threads, items, attachments, feedback.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _identity() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column("seq", sa.BigInteger(), sa.Identity(always=False), nullable=False)


def upgrade() -> None:
    op.create_table(
        "chatkit_threads",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        _identity(),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("data", postgresql.JSONB(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "id", name=op.f("pk_chatkit_threads")),
    )
    op.create_index(
        op.f("ix_chatkit_threads_user_id_created_at_seq"),
        "chatkit_threads",
        ["user_id", "created_at", "seq"],
    )
    op.create_table(
        "chatkit_items",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("thread_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        _identity(),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("data", postgresql.JSONB(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id", "thread_id"],
            ["chatkit_threads.user_id", "chatkit_threads.id"],
            name=op.f("fk_chatkit_items_user_id_thread_id_chatkit_threads"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", "thread_id", "id", name=op.f("pk_chatkit_items")),
    )
    op.create_index(
        op.f("ix_chatkit_items_user_id_thread_id_created_at_seq"),
        "chatkit_items",
        ["user_id", "thread_id", "created_at", "seq"],
    )
    op.create_table(
        "chatkit_attachments",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("thread_id", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("data", postgresql.JSONB(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id", "thread_id"],
            ["chatkit_threads.user_id", "chatkit_threads.id"],
            name=op.f("fk_chatkit_attachments_user_id_thread_id_chatkit_threads"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", "id", name=op.f("pk_chatkit_attachments")),
    )
    op.create_index(
        op.f("ix_chatkit_attachments_user_id_thread_id"),
        "chatkit_attachments",
        ["user_id", "thread_id"],
    )
    op.create_table(
        "chatkit_feedback",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("thread_id", sa.Text(), nullable=False),
        sa.Column("item_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "kind IN ('positive', 'negative')", name=op.f("ck_chatkit_feedback_kind")
        ),
        sa.ForeignKeyConstraint(
            ["user_id", "thread_id", "item_id"],
            ["chatkit_items.user_id", "chatkit_items.thread_id", "chatkit_items.id"],
            name=op.f("fk_chatkit_feedback_user_id_thread_id_item_id_chatkit_items"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "user_id", "thread_id", "item_id", name=op.f("pk_chatkit_feedback")
        ),
    )


def downgrade() -> None:
    op.drop_table("chatkit_feedback")
    op.drop_index(
        op.f("ix_chatkit_attachments_user_id_thread_id"), table_name="chatkit_attachments"
    )
    op.drop_table("chatkit_attachments")
    op.drop_index(
        op.f("ix_chatkit_items_user_id_thread_id_created_at_seq"), table_name="chatkit_items"
    )
    op.drop_table("chatkit_items")
    op.drop_index(op.f("ix_chatkit_threads_user_id_created_at_seq"), table_name="chatkit_threads")
    op.drop_table("chatkit_threads")
