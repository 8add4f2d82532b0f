"""Which run is going in a thread: what a reloaded page asks (``GET {CHATKIT_PATH}/threads/<id>/run``,
docs/runs.md) to bring a reply that outlived its connection into view when it ends.

* ``ix_chatkit_runs_user_id_thread_id``: a partial index of the **running** runs by
  ``(user_id, thread_id)``. Only running rows are in it, so it stays as small as the number of
  replies in flight, and the per-batch updates of ``last_seq``/``heartbeat_at`` do not touch its
  columns (they stay HOT updates); a row leaves it once, when its run ends. Built
  CONCURRENTLY (autocommit), so writers of ``chatkit_runs`` are never blocked by the build; an
  interrupted build's invalid index is dropped and built again.
* ``chatkit_run_of_thread(user, thread)``: the newest running run of the user's thread and its
  last logged seq, one row or none (another user's thread finds nothing, like a missing one).
* ``chatkit_run_set_thread(user, run, thread)``: a ``threads.create`` run learns its new
  thread's id from its first event (app.http.runs); a run whose row already has one keeps it.

Both functions run with the caller's rights and set ``app.user_id`` themselves (row-level
security, docs/rls.md), as migration 0006's do.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_chatkit_runs_user_id_thread_id"

RUN_OF_THREAD = """
CREATE OR REPLACE FUNCTION chatkit_run_of_thread(p_user text, p_thread text)
RETURNS TABLE (id text, last_seq integer) LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    RETURN QUERY
        SELECT r.id, r.last_seq FROM chatkit_runs r
        WHERE r.user_id = p_user AND r.thread_id = p_thread AND r.state = 'running'
        ORDER BY r.created_at DESC LIMIT 1;
END
$$
"""

RUN_SET_THREAD = """
CREATE OR REPLACE FUNCTION chatkit_run_set_thread(p_user text, p_run text, p_thread text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    UPDATE chatkit_runs SET thread_id = p_thread
        WHERE user_id = p_user AND id = p_run AND thread_id IS NULL;
END
$$
"""

SIGNATURES = (
    "chatkit_run_of_thread(text, text)",
    "chatkit_run_set_thread(text, text, text)",
)


def upgrade() -> None:
    op.execute(RUN_OF_THREAD)
    op.execute(RUN_SET_THREAD)
    with op.get_context().autocommit_block():
        valid = (
            op.get_bind()
            .execute(
                sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:n)"),
                {"n": INDEX},
            )
            .scalar()
        )
        if valid is False:  # left by an interrupted build
            op.execute(f"DROP INDEX CONCURRENTLY {INDEX}")
        op.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} ON chatkit_runs "
            "(user_id, thread_id) WHERE state = 'running'"
        )


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {INDEX}")
    for signature in SIGNATURES:
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")
