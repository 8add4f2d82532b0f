"""Row-level security: a chatkit_ row is visible and writable only for the user in app.user_id.

Every chatkit_ table gets one policy, for all commands, keyed on the per-transaction setting
``app.user_id`` that each statement of the app makes itself (``set_config('app.user_id', $1,
true)``, see app.pg.store): rows of other users are invisible to reads, updates and deletes, and a
row written for another user is refused (WITH CHECK). With no user set the setting is NULL or
empty and nothing is visible.

The tables are not FORCEd: their owner (the role that runs these migrations) and superusers keep
bypassing row-level security, so ``alembic`` and the operator's ``python -m app prune`` work with
the owner's credentials. The app must therefore connect as another role, one without
BYPASSRLS (docs/rls.md shows how operators create it). Foreign-key checks and ON DELETE CASCADE
run as the table owner and are not affected.

Alembic's autogenerate does not compare policies; the tests check them (tests/pg/test_rls.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    "chatkit_threads",
    "chatkit_items",
    "chatkit_attachments",
    "chatkit_attachment_blobs",
    "chatkit_feedback",
)
POLICY = "chatkit_user_isolation"
USER_MATCHES = "user_id = current_setting('app.user_id', true)"


def upgrade() -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY {POLICY} ON {table} FOR ALL "
            f"USING ({USER_MATCHES}) WITH CHECK ({USER_MATCHES})"
        )


def downgrade() -> None:
    for table in reversed(TABLES):
        op.execute(f"DROP POLICY IF EXISTS {POLICY} ON {table}")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
