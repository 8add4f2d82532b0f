"""Round trips of a turn, and the run log on a Citus cluster (docs/runs.md, docs/citus.md).

**A turn's opening in one statement**: ``chatkit_turn_begin``.

A streaming ``threads.add_user_message`` used to open with four round trips before its first
event could be written: the rate limiter's upsert, the thread's load, the stream lease and (for
a resumable reply) the run's row. This function does all four in one call, in that order and in
one transaction, each only if the one before let it: a refused request reads nothing and takes
nothing (the wait until the next request fits comes back with the refusal, saving the second
statement a refusal cost), another user's thread or a missing one takes no lease, a busy or
full lease starts no run. The parts are the functions and statements of revisions 0004 and 0006
unchanged (the lease under its per-user advisory lock, the run's insert), so their guarantees
hold as they did.

On a Citus cluster the limiter's tables live on the coordinator and the thread on its user's
shard, so the app keeps the separate statements there (app.pg.limits).

**The run log's functions, as a cluster can run them.** ``python -m app distribute`` distributes
``chatkit_runs`` and ``chatkit_run_events`` by ``user_id`` and delegates each run log function
to its user's worker, where Citus plans the function's statements as distributed ones: it refuses
a non-IMMUTABLE function inside CASE (revision 0006's ``ended_at = CASE ... now() END``) and
evaluates ``now()`` of a write on the node that plans it. The functions are replaced by
equivalents that take the time once into a variable (a constant for the planner); on one node
nothing changes but that.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# p_interval NULL: not counted here (the rate limit is off, or the request was counted before).
# p_read false (on a Citus cluster): the thread is not read here (it is on a worker) and the lease
# is taken for it as named; its data comes back NULL. p_run NULL: no run to start. Returns one row: whether the request was admitted, and then
# either the seconds until it would fit (refused), or the thread's data (NULL: not this user's
# thread) and the lease's outcome ('taken', 'busy', 'full'; NULL when no thread).
TURN_BEGIN = """
CREATE FUNCTION chatkit_turn_begin(
    p_user text, p_interval double precision, p_burst double precision, p_thread text,
    p_lease text, p_limit integer, p_ttl double precision, p_run text, p_read boolean
) RETURNS TABLE (admitted boolean, wait double precision, thread text, lease text)
LANGUAGE plpgsql AS $$
DECLARE
    step interval := make_interval(secs => coalesce(p_interval, 0));
    thread_data text;
    outcome text;
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    IF p_interval IS NOT NULL THEN
        INSERT INTO chatkit_rate_limits AS r (user_id, tat) VALUES (p_user, now() + step)
            ON CONFLICT (user_id) DO UPDATE SET tat = greatest(r.tat, now()) + step
            WHERE greatest(r.tat, now()) + step <= now() + make_interval(secs => p_burst);
        IF NOT FOUND THEN
            RETURN QUERY SELECT false, extract(epoch FROM greatest(l.tat, now()) + step
                    - make_interval(secs => p_burst) - now())::float8, NULL::text, NULL::text
                FROM chatkit_rate_limits l WHERE l.user_id = p_user;
            RETURN;
        END IF;
    END IF;
    IF NOT p_read THEN
        RETURN QUERY SELECT true, NULL::float8, NULL::text,
            chatkit_take_stream_lease(p_user, p_lease, p_thread, p_limit, p_ttl);
        RETURN;
    END IF;
    SELECT t.data::text INTO thread_data FROM chatkit_threads t
        WHERE t.user_id = p_user AND t.id = p_thread;
    IF thread_data IS NULL THEN
        RETURN QUERY SELECT true, NULL::float8, NULL::text, NULL::text;
        RETURN;
    END IF;
    outcome := chatkit_take_stream_lease(p_user, p_lease, p_thread, p_limit, p_ttl);
    IF outcome = 'taken' AND p_run IS NOT NULL THEN
        INSERT INTO chatkit_runs (user_id, id, thread_id) VALUES (p_user, p_run, p_thread);
    END IF;
    RETURN QUERY SELECT true, NULL::float8, thread_data, outcome;
END
$$
"""
SIGNATURE = (
    "chatkit_turn_begin(text, double precision, double precision, text, text, integer, "
    "double precision, text, boolean)"
)

# The store's add_thread_item (app.pg.store.SQL_ADD_ITEM, the same upsert) as a function, for a
# Citus cluster: delegated to the user's worker (``python -m app distribute``), it is one round
# trip where the statement itself needs three there (the user set for the worker's transaction,
# the statement, the commit: app.pg.citus). One node keeps the plain statement.
ADD_ITEM = """
CREATE FUNCTION chatkit_add_item(
    p_user text, p_thread text, p_id text, p_created timestamptz, p_type text, p_data jsonb
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    written integer;
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data)
        VALUES (p_user, p_thread, p_id, p_created, p_type, p_data)
        ON CONFLICT (user_id, thread_id, id) DO UPDATE SET created_at = EXCLUDED.created_at,
            type = EXCLUDED.type, data = EXCLUDED.data
        WHERE chatkit_items.data = EXCLUDED.data
            OR (chatkit_items.type = 'workflow' AND EXCLUDED.type = 'workflow')
        RETURNING 1 INTO written;
    RETURN written;
END
$$
"""
# A resumable turn's run started with its thread read, on a Citus cluster (where
# ``chatkit_turn_begin`` reads neither: they are on the user's worker, this function is delegated
# there): the run's row only if the thread is the user's; returns the thread's data, or NULL.
RUN_OPEN = """
CREATE FUNCTION chatkit_run_open(p_user text, p_run text, p_thread text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    thread_data text;
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    SELECT t.data::text INTO thread_data FROM chatkit_threads t
        WHERE t.user_id = p_user AND t.id = p_thread;
    IF thread_data IS NOT NULL THEN
        INSERT INTO chatkit_runs (user_id, id, thread_id) VALUES (p_user, p_run, p_thread);
    END IF;
    RETURN thread_data;
END
$$
"""
RUN_OPEN_SIGNATURE = "chatkit_run_open(text, text, text)"
ADD_ITEM_SIGNATURE = "chatkit_add_item(text, text, text, timestamp with time zone, text, jsonb)"


RUN_APPEND = """
CREATE OR REPLACE FUNCTION chatkit_run_append(
    p_user text, p_run text, p_first_seq integer, p_events text[], p_state text
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    cancel boolean;
    t timestamptz := now();
    ended timestamptz := CASE WHEN p_state = 'running' THEN NULL ELSE now() END;
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    UPDATE chatkit_runs
        SET last_seq = p_first_seq + coalesce(cardinality(p_events), 0) - 1,
            heartbeat_at = t,
            state = p_state,
            ended_at = ended
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

RUN_CANCEL = """
CREATE OR REPLACE FUNCTION chatkit_run_cancel(p_user text, p_run text, p_retention double precision)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    found_state text;
    since timestamptz := now() - make_interval(secs => p_retention);
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    UPDATE chatkit_runs SET cancel_requested = cancel_requested OR state = 'running'
        WHERE user_id = p_user AND id = p_run AND (ended_at IS NULL OR ended_at > since)
        RETURNING state INTO found_state;
    RETURN found_state;
END
$$
"""

RUN_ABANDON = """
CREATE OR REPLACE FUNCTION chatkit_run_abandon(
    p_user text, p_run text, p_dead_after double precision
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz := now();
BEGIN
    PERFORM set_config('app.user_id', p_user, true);
    UPDATE chatkit_runs SET state = 'lost', ended_at = t
        WHERE user_id = p_user AND id = p_run AND state = 'running'
            AND heartbeat_at < t - make_interval(secs => p_dead_after);
    RETURN FOUND;
END
$$
"""


def upgrade() -> None:
    op.execute(TURN_BEGIN)
    op.execute(ADD_ITEM)
    op.execute(RUN_OPEN)
    for function in (RUN_APPEND, RUN_CANCEL, RUN_ABANDON):
        op.execute(function)


def downgrade() -> None:
    op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
    op.execute(f"DROP FUNCTION IF EXISTS {ADD_ITEM_SIGNATURE}")
    op.execute(f"DROP FUNCTION IF EXISTS {RUN_OPEN_SIGNATURE}")
    # Revision 0006's own forms back.
    path = Path(__file__).with_name("20261206_0006_run_log.py")
    spec = importlib.util.spec_from_file_location("run_log_0006", path)
    assert spec is not None and spec.loader is not None
    run_log = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_log)
    for function in (run_log.RUN_APPEND, run_log.RUN_CANCEL, run_log.RUN_ABANDON):
        op.execute(function.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
