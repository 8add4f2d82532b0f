"""A turn's opening in one statement: ``chatkit_turn_begin`` (docs/runs.md, "Round trips").

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

Revision ID: 0009
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# p_interval NULL: not counted here (the rate limit is off, or the request was counted before).
# p_run NULL: no run to start. Returns one row: whether the request was admitted, and then
# either the seconds until it would fit (refused), or the thread's data (NULL: not this user's
# thread) and the lease's outcome ('taken', 'busy', 'full'; NULL when no thread).
TURN_BEGIN = """
CREATE FUNCTION chatkit_turn_begin(
    p_user text, p_interval double precision, p_burst double precision, p_thread text,
    p_lease text, p_limit integer, p_ttl double precision, p_run text
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
    "double precision, text)"
)


def upgrade() -> None:
    op.execute(TURN_BEGIN)


def downgrade() -> None:
    op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
