"""The run log: resumable replies (docs/runs.md) and the events they streamed.

``chatkit_runs`` holds one row per opted-in reply (``X-Chatkit-Resumable: true``): its state,
the last sequence number logged, the heartbeat of the process running it and whether someone
asked it to stop. ``chatkit_run_events`` holds the reply's SSE events, one row per event, written
in batches by ``chatkit_run_append`` (one call per batch: events, state, heartbeat, and the
cancel flag read back, in one round trip).

Both are UNLOGGED, like the limiter's tables of revision 0004: every batch of a streaming reply
writes them, and an unlogged write commits without waiting for a WAL flush (measured: see
docs/runs.md). What is lost if PostgreSQL itself crashes is only the replay window of replies in
flight, whose connections die with the server anyway; the reply itself is stored in
``chatkit_items`` (logged) as before. Standbys do not get them: after a failover, resumers of
older runs get a 404 and reload the thread.

Both get revision 0003's row-level security policy. Functions run with the caller's rights and
set ``app.user_id`` themselves before they read a table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("chatkit_runs", "chatkit_run_events")
POLICY = "chatkit_user_isolation"
USER_MATCHES = "user_id = current_setting('app.user_id', true)"


def upgrade() -> None:
    op.create_table(
        "chatkit_runs",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("thread_id", sa.Text(), nullable=True),
        # running, then completed, cancelled, failed (an error event ends it) or lost (its
        # process stopped writing: app.chat.runs).
        sa.Column("state", sa.Text(), nullable=False, server_default="running"),
        sa.Column("last_seq", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default="false"),
        sa.Column(
            "heartbeat_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("user_id", "id", name=op.f("pk_chatkit_runs")),
        prefixes=["UNLOGGED"],
    )
    op.create_table(
        "chatkit_run_events",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        # The SSE event's lines as sent (``data: {...}``), without the ``id:`` line.
        sa.Column("data", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "run_id", "seq", name=op.f("pk_chatkit_run_events")),
        sa.ForeignKeyConstraint(
            ["user_id", "run_id"],
            ["chatkit_runs.user_id", "chatkit_runs.id"],
            name=op.f("fk_chatkit_run_events_user_id_run_id_chatkit_runs"),
            ondelete="CASCADE",
        ),
        prefixes=["UNLOGGED"],
    )
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY {POLICY} ON {table} FOR ALL "
            f"USING ({USER_MATCHES}) WITH CHECK ({USER_MATCHES})"
        )
    for function in FUNCTIONS:
        op.execute(function)


# One call per batch. Appends the events numbered from p_first_seq (the caller numbers them,
# without gaps), advances last_seq, renews the heartbeat and, with p_state other than
# 'running', ends the run. Returns whether a cancel was asked for (by any process), or NULL when
# the run is no longer running here (a resumer declared it lost): the caller then stops.
RUN_APPEND = """
CREATE FUNCTION chatkit_run_append(
    p_user text, p_run text, p_first_seq integer, p_events text[], p_state text
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    cancel boolean;
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    UPDATE chatkit_runs
        SET last_seq = p_first_seq + coalesce(cardinality(p_events), 0) - 1,
            heartbeat_at = now(),
            state = p_state,
            ended_at = CASE WHEN p_state = 'running' THEN NULL ELSE now() END
        WHERE user_id = p_user AND id = p_run AND state = 'running'
            AND last_seq = p_first_seq - 1
        RETURNING cancel_requested INTO cancel;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF cardinality(p_events) > 0 THEN
        INSERT INTO chatkit_run_events (user_id, run_id, seq, data)
            SELECT p_user, p_run, p_first_seq + e.n - 1, e.data
            FROM unnest(p_events) WITH ORDINALITY AS e(data, n);
    END IF;
    RETURN cancel;
END
$$
"""

RUN_START = """
CREATE FUNCTION chatkit_run_start(p_user text, p_run text, p_thread text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    INSERT INTO chatkit_runs (user_id, id, thread_id) VALUES (p_user, p_run, p_thread);
END
$$
"""

# A resumer's read: the run's state, and its events after p_after (at most p_limit), one row
# each; one row with a NULL seq when there are none. No row at all when the run does not exist
# for this user or ended more than p_retention seconds ago: both read as "not found".
# ``age`` is how long ago the run's process last wrote (its heartbeat).
RUN_READ = """
CREATE FUNCTION chatkit_run_read(
    p_user text, p_run text, p_after integer, p_limit integer, p_retention double precision
) RETURNS TABLE (state text, last_seq integer, age double precision, seq integer, data text)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    RETURN QUERY
        SELECT r.state, r.last_seq, extract(epoch FROM now() - r.heartbeat_at)::float8,
               e.seq, e.data
        FROM chatkit_runs r
        LEFT JOIN LATERAL (
            SELECT x.seq, x.data FROM chatkit_run_events x
            WHERE x.user_id = p_user AND x.run_id = p_run AND x.seq > p_after
            ORDER BY x.seq LIMIT p_limit
        ) e ON true
        WHERE r.user_id = p_user AND r.id = p_run
            AND (r.ended_at IS NULL OR r.ended_at > now() - make_interval(secs => p_retention))
        ORDER BY e.seq;
END
$$
"""

# Asks the run to stop, wherever it runs (its process reads the flag back at its next batch or
# heartbeat). Returns the run's state, NULL when there is no such run for this user.
RUN_CANCEL = """
CREATE FUNCTION chatkit_run_cancel(p_user text, p_run text, p_retention double precision)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    found_state text;
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    UPDATE chatkit_runs SET cancel_requested = cancel_requested OR state = 'running'
        WHERE user_id = p_user AND id = p_run
            AND (ended_at IS NULL OR ended_at > now() - make_interval(secs => p_retention))
        RETURNING state INTO found_state;
    RETURN found_state;
END
$$
"""

# A resumer found the run's process silent for p_dead_after seconds: the run is declared lost
# (once: whoever comes first). No event is logged for it: the process may have sent events it
# had not logged yet, so each resumer ends its own stream with an error event numbered after
# the last one it has (app.chat.runs). The process, if it was only slow, finds its run no
# longer running at its next batch and stops. Returns whether this call declared it.
RUN_ABANDON = """
CREATE FUNCTION chatkit_run_abandon(p_user text, p_run text, p_dead_after double precision)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    UPDATE chatkit_runs SET state = 'lost', ended_at = now()
        WHERE user_id = p_user AND id = p_run AND state = 'running'
            AND heartbeat_at < now() - make_interval(secs => p_dead_after);
    RETURN FOUND;
END
$$
"""

FUNCTIONS = (RUN_START, RUN_APPEND, RUN_READ, RUN_CANCEL, RUN_ABANDON)
SIGNATURES = (
    "chatkit_run_start(text, text, text)",
    "chatkit_run_append(text, text, integer, text[], text)",
    "chatkit_run_read(text, text, integer, integer, double precision)",
    "chatkit_run_cancel(text, text, double precision)",
    "chatkit_run_abandon(text, text, double precision)",
)


def downgrade() -> None:
    for signature in SIGNATURES:
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")
    op.drop_table("chatkit_run_events")
    op.drop_table("chatkit_runs")
