"""The example plugin's table: each user's tasks, behind the same row-level security policy as
the app's tables (a row is visible and writable only while ``app.user_id`` names its user).

A plugin's revisions are a branch of their own: the first has no ``down_revision`` and a
branch label, and ``python -m app migrate`` upgrades every branch to its head.

Revision ID: plugin_tasks_0001
Revises:
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "plugin_tasks_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("plugin_tasks",)
depends_on: str | Sequence[str] | None = None

USER_MATCHES = "user_id = current_setting('app.user_id', true)"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE plugin_tasks (
            user_id text NOT NULL,
            id bigint GENERATED ALWAYS AS IDENTITY,
            title text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
            done boolean NOT NULL DEFAULT false,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (user_id, id)
        )
        """
    )
    op.execute("ALTER TABLE plugin_tasks ENABLE ROW LEVEL SECURITY")
    op.execute(
        "CREATE POLICY plugin_tasks_user_isolation ON plugin_tasks FOR ALL "
        f"USING ({USER_MATCHES}) WITH CHECK ({USER_MATCHES})"
    )


def downgrade() -> None:
    op.execute("DROP TABLE plugin_tasks")
