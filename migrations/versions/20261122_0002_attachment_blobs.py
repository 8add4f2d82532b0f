"""Attachment bytes in PostgreSQL: upload state on chatkit_attachments, chunks in a blob table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows written before this revision never had bytes here: they stay 'pending' (never
    # served) and `prune` removes them like any upload that was never attached.
    op.add_column(
        "chatkit_attachments",
        sa.Column("status", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
    )
    op.add_column("chatkit_attachments", sa.Column("size_bytes", sa.BigInteger(), nullable=True))
    op.add_column("chatkit_attachments", sa.Column("mime_type", sa.Text(), nullable=True))
    op.add_column(
        "chatkit_attachments",
        sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_check_constraint(
        op.f("ck_chatkit_attachments_status"),
        "chatkit_attachments",
        "status IN ('pending', 'uploading', 'ready')",
    )
    op.create_check_constraint(
        op.f("ck_chatkit_attachments_size_bytes"), "chatkit_attachments", "size_bytes >= 0"
    )
    op.create_table(
        "chatkit_attachment_blobs",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("attachment_id", sa.Text(), nullable=False),
        sa.Column("chunk_no", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("chunk_no >= 0", name=op.f("ck_chatkit_attachment_blobs_chunk_no")),
        sa.ForeignKeyConstraint(
            ["user_id", "attachment_id"],
            ["chatkit_attachments.user_id", "chatkit_attachments.id"],
            # The naming convention's name, shortened by SQLAlchemy to PostgreSQL's 63 bytes.
            name=op.f("fk_chatkit_attachment_blobs_user_id_attachment_id_chatk_eee9"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "user_id", "attachment_id", "chunk_no", name=op.f("pk_chatkit_attachment_blobs")
        ),
    )


def downgrade() -> None:
    op.drop_table("chatkit_attachment_blobs")
    op.drop_constraint(
        op.f("ck_chatkit_attachments_size_bytes"), "chatkit_attachments", type_="check"
    )
    op.drop_constraint(op.f("ck_chatkit_attachments_status"), "chatkit_attachments", type_="check")
    op.drop_column("chatkit_attachments", "uploaded_at")
    op.drop_column("chatkit_attachments", "mime_type")
    op.drop_column("chatkit_attachments", "size_bytes")
    op.drop_column("chatkit_attachments", "status")
