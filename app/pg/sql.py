"""How the store's statements are written: the row-level-security shapes every statement of the
app takes (a gate that sets ``app.user_id`` before any chatkit_ row is read), their Citus forms,
and the keyset page queries, with and without the rate limiter folded in (app.pg.admission).

Only SQL text lives here, built once at import from constant table and column names; values
are always bound parameters. app.pg.store, app.pg.limits and app.files.store build their statements
with these helpers; tests/pg/test_rls.py checks every statement's plan for the shapes below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class _PageSQL:
    first: str
    after: str
    exists: str
    # ``first`` and ``after`` folded with the limiter's upsert (app.pg.admission): the interval
    # and the burst follow their arguments.
    first_admitted: str
    after_admitted: str


# --- row-level security -----------------------------------------------------------------------
#
# Migration 0003 gives every chatkit_ table a policy: a row is visible and writable only while
# the transaction's ``app.user_id`` setting names its user (the app's database role does not
# bypass it; see docs/rls.md). Every statement here makes that setting itself, for its own
# implicit transaction and in the same round trip, with ``set_config('app.user_id', $1, true)``
# ($1 is always the user id), and is shaped so that no chatkit_ row is read before it is made.
#
# The tool is a gate, ``(SELECT set_config('app.user_id', $1, true)) IS NOT NULL``: a condition
# without columns, which PostgreSQL evaluates as the One-Time Filter of a Result node (running
# the InitPlan that calls set_config), and a Result tests that filter before it runs anything
# beneath it. What matters is that nothing reading the setting is evaluated before the gate:
# PostgreSQL combines the policy's ``user_id = current_setting(...)`` with our ``user_id = $1``
# into a check ``current_setting(...) = $1`` that it also evaluates once, up front.
#
# * Reads are the query as it was, fenced in a subquery (OFFSET 0: never pulled up, nothing
#   pushed into it), under the gate. The derived check stays inside the subquery, below the
#   gate's Result; the subquery keeps its plan and its order (no extra sort).
# * Inserts take every value from a SELECT over ``s``, the one-row relation that calls
#   set_config: no row exists, so no WITH CHECK or ON CONFLICT check can run, before it has.
# * Updates and deletes cannot put their target table in a subquery, so the gate goes into their
#   own WHERE clause and the derived check lands in the same One-Time Filter. PostgreSQL orders
#   those clauses by cost, and the gate (a NULL test of a parameter) costs nothing, so it is
#   evaluated first.
#
# A lateral subquery over ``s`` also orders a read, but PostgreSQL must then sort its output
# again; without OFFSET 0 it may scan the table before ``s``, and ``USING s`` in a DELETE does not
# order anything. tests/pg/test_rls.py checks every statement's plan for the shapes above, custom
# and generic, and runs the store contract through a role subject to the policy. The explicit
# ``user_id`` filters stay: they are the first wall, and the only one for a role that bypasses
# row-level security (the owner, a superuser, the embedded development server).

# --- on a Citus cluster ------------------------------------------------------------------------
#
# Reads run as they are on a cluster (the worker runs the gate itself); writes need the user set
# for the worker's transaction, and a statement Citus routes to one shard: app.pg.citus runs them.
# The builders below record each write's Citus form next to its one-node form: the same
# statement without the gate, and an insert from VALUES. tests/citus/ prove the setting
# reaches the worker and that every statement is single-shard.

CITUS_FORMS: dict[str, str] = {}
"""One-node statement -> its Citus form, for every write built by the helpers below."""
CITUS_CALLS: dict[str, str] = {}
"""One-node statement -> a call of a function that does the same on a cluster, delegated to the
user's worker (``python -m app distribute``): one round trip instead of the Citus form's three.
For the writes every turn makes (app.pg.store)."""

GATE = "(SELECT set_config('app.user_id', $1, true)) IS NOT NULL"
"""Sets ``app.user_id`` for the statement's transaction before it reads a table."""
AS_USER = "(SELECT set_config('app.user_id', $1, true) AS uid) s"
"""The one-row relation whose ``uid`` is the user id, set for the transaction as it is read."""


def _user_filtered(sql: str) -> None:
    if "WHERE user_id = $1 AND " not in sql and not sql.endswith("WHERE user_id = $1"):
        raise ValueError("the statement must filter by user_id = $1 itself")


def gated_select(columns: str, query: str, order_by: str = "") -> str:
    """``query`` (filtering by ``user_id = $1``) fenced under the gate.

    ``columns`` and ``order_by`` name ``q.<column>``s of the query's output; an ORDER BY of the
    query that matches ``order_by`` carries through without a sort.
    """
    _user_filtered(query.split(" ORDER BY ", 1)[0])
    tail = f" ORDER BY {order_by}" if order_by else ""
    return f"SELECT {columns} FROM ({query} OFFSET 0) q WHERE {GATE}{tail}"


def scoped_insert(into: str, values: str, on_conflict: str = "") -> str:
    """``INSERT INTO into SELECT s.uid, values FROM AS_USER``: ``into``'s first column is
    ``user_id`` and ``values`` (cast to their column types) follow it."""
    if not into.split("(", 1)[1].lstrip().startswith("user_id"):
        raise ValueError("a scoped insert takes user_id from s.uid, as its first column")
    tail = f" {on_conflict}" if on_conflict else ""
    sql = f"INSERT INTO {into} SELECT s.uid, {values} FROM {AS_USER}{tail}"
    CITUS_FORMS[sql] = f"INSERT INTO {into} VALUES ($1, {values}){tail}"
    return sql


def gated(statement: str, returning: str = "") -> str:
    """An UPDATE or DELETE whose WHERE clause (filtering ``user_id = $1``) ends with the gate."""
    _user_filtered(statement)
    tail = f" {returning}" if returning else ""
    sql = f"{statement} AND {GATE}{tail}"
    CITUS_FORMS[sql] = f"{statement}{tail}"
    return sql


def rate_admit_sql(interval: str, burst: str) -> str:
    """app.pg.limits' GCRA upsert, its interval and burst (seconds) in the parameters named: it
    returns a row when the request is admitted, none when it is refused."""
    step = f"make_interval(secs => {interval}::float8)"
    return scoped_insert(
        "chatkit_rate_limits AS r (user_id, tat)",
        f"now() + {step}",
        f"ON CONFLICT (user_id) DO UPDATE SET tat = greatest(r.tat, now()) + {step} "
        f"WHERE greatest(r.tat, now()) + {step} <= now() + make_interval(secs => {burst}::float8) "
        "RETURNING 1",
    )


# $2: the interval, $3: the burst; how long until a refused request would fit.
RATE_WAIT = gated_select(
    "q.wait",
    "SELECT extract(epoch FROM greatest(tat, now()) + make_interval(secs => $2::float8) "
    "- make_interval(secs => $3::float8) - now())::float8 AS wait "
    "FROM chatkit_rate_limits WHERE user_id = $1",
)


def _admitted(query: str, nargs: int, direction: str) -> str:
    """The page ``query`` (gated), read only once the limiter's upsert, a data-modifying CTE of
    the same statement, has admitted the request: ``ok`` on every row, and one row with a null
    id when the page is empty or the request refused. The admission is a One-Time Filter above
    the page's gate, so a refused request reads no page (OFFSET 0 keeps the test in the
    subquery: PostgreSQL 16 would otherwise pull it up into a join filter, applied only after
    the page was read). The interval and the burst are the
    parameters after the page's ``nargs``."""
    admit = rate_admit_sql(f"${nargs + 1}", f"${nargs + 2}")
    page = gated_select(
        "q.id, q.data, q.created_at, q.seq", query, f"q.created_at {direction}, q.seq {direction}"
    )
    return (
        f"WITH a AS ({admit}) SELECT k.ok, pg.id, pg.data FROM (SELECT EXISTS (SELECT FROM a) "
        f"AS ok) k LEFT JOIN LATERAL (SELECT g.* FROM ({page}) g WHERE k.ok OFFSET 0) pg ON true "
        f"ORDER BY pg.created_at {direction}, pg.seq {direction}"
    )


def _page_sql(table: str, scope: str, nscope: int, order: Literal["asc", "desc"]) -> _PageSQL:
    """Keyset queries on (created_at, seq): an index range scan whatever the page depth.

    ``scope`` filters columns $1..$nscope, ``user_id`` first; the cursor id and the limit
    follow. Only constant table and column names are interpolated (built once at import);
    values are always bound.
    """
    cmp, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
    cursor = f"${nscope + 1}"
    limit = f"${nscope + 2}"
    cols = scope.split(",")
    if cols[0] != "user_id":
        raise ValueError("pages are scoped by user_id first")
    where = " AND ".join(f"{c} = ${i + 1}" for i, c in enumerate(cols))
    order_by = f"created_at {direction}, seq {direction}"
    outer = f"q.created_at {direction}, q.seq {direction}"
    first = (
        f"SELECT id, data::text AS data, created_at, seq FROM {table} WHERE {where} "
        f"ORDER BY {order_by} LIMIT {cursor}"
    )
    # LATERAL pins the cursor row first, so the page is a parameterised range scan.
    after = (
        f"SELECT p.id, p.data, p.created_at, p.seq FROM (SELECT created_at, seq FROM {table} "
        f"WHERE {where} AND id = {cursor}) c CROSS JOIN LATERAL ("
        f"SELECT id, data::text AS data, created_at, seq FROM {table} WHERE {where} "
        f"AND (created_at, seq) {cmp} (c.created_at, c.seq) "
        f"ORDER BY {order_by} LIMIT {limit}) p ORDER BY p.{order_by.replace(', ', ', p.')}"
    )
    return _PageSQL(
        first=gated_select("q.id, q.data", first, outer),
        after=gated_select("q.id, q.data", after, outer),
        exists=gated_select("1", f"SELECT 1 FROM {table} WHERE {where} AND id = {cursor}"),
        first_admitted=_admitted(first, nscope + 1, direction),
        after_admitted=_admitted(after, nscope + 2, direction),
    )


_THREAD_PAGES = {o: _page_sql("chatkit_threads", "user_id", 1, o) for o in ("asc", "desc")}
_ITEM_PAGES = {o: _page_sql("chatkit_items", "user_id,thread_id", 2, o) for o in ("asc", "desc")}
