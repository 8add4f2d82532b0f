"""The statement builders of app.pg.sql refuse a statement that does not filter by the user
itself: the explicit ``user_id = $1`` filter is the first wall (the only one for a role that
bypasses row-level security), so a read or a write built without it must fail at import, not
run unscoped as the owner."""

from __future__ import annotations

import pytest

from app.pg import sql


@pytest.mark.parametrize(
    "query",
    [
        "SELECT id FROM chatkit_threads",
        "SELECT id FROM chatkit_threads WHERE id = $2",
        "SELECT id FROM chatkit_threads WHERE user_id = $2",
        "SELECT id FROM chatkit_threads WHERE id = $2 OR user_id = $1",
        "SELECT id FROM chatkit_threads WHERE user_id = $1 OR id = $2",
    ],
)
def test_a_read_without_the_user_filter_is_refused(query: str) -> None:
    with pytest.raises(ValueError, match="user_id = \\$1"):
        sql.gated_select("q.id", query)
    with pytest.raises(ValueError, match="user_id = \\$1"):
        sql.gated(query.replace("SELECT id FROM", "DELETE FROM"))


def test_a_read_with_the_user_filter_is_gated() -> None:
    for query in (
        "SELECT id FROM chatkit_threads WHERE user_id = $1",
        "SELECT id FROM chatkit_threads WHERE user_id = $1 AND id = $2 ORDER BY id",
    ):
        built = sql.gated_select("q.id", query, "q.id")
        assert built.startswith(f"SELECT q.id FROM ({query} OFFSET 0) q WHERE {sql.GATE}")
