"""A request's rate-limit admission, deferred so the store can fold it into the request's own
statement (app.pg.limits explains the limiter; app.http.endpoint decides which requests defer).

A list request (``threads.list``, ``items.list``) reads and changes nothing else, so it may be
admitted by the very statement that reads its page: the endpoint puts a ``PendingAdmission`` on
the request's context (``RequestContext.page_fold``), ``PostgresStore._page`` runs it as the
limiter's upsert and the page in one statement, and the admission marks itself consumed; the
endpoint admits the usual way afterwards only when nothing consumed it (another store, a Citus
cluster, an error before the store ran). Either way the request counts once. The store knows it
only as a ``PageFold`` (app.context): which statement, which parameters, and the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from app.errors import TooManyRequestsError
from app.pg.sql import RATE_WAIT


@dataclass
class PendingAdmission:
    """One request's turn against ``user_id``'s budget: ``interval`` seconds per request and a
    ``burst`` of that many seconds (app.pg.limits' GCRA). ``consumed`` once it has been counted
    (admitted or refused), so that it never counts twice."""

    user_id: str
    interval: float
    burst: float
    consumed: bool = False

    # --- as a PageFold (app.context), for PostgresStore._page ---------------------------------

    def pending(self, user_id: str) -> bool:
        return not self.consumed and self.user_id == user_id

    def statement(self, forms: Any, first: bool) -> tuple[str, tuple[Any, ...]]:
        """The page's admitted form (app.pg.sql: the upsert as a data-modifying CTE that the
        page waits for; ``forms`` is a ``_PageSQL``) and its parameters, the interval and the burst."""
        sql = forms.first_admitted if first else forms.after_admitted
        return sql, (self.interval, self.burst)

    async def verdict(self, conn: Any, ok: bool) -> None:
        """Counted, admitted or not; a refusal is the 429, with the wait asked on ``conn``."""
        self.consumed = True
        if not ok:
            raise refused(await conn.fetchval(RATE_WAIT, self.user_id, self.interval, self.burst))


def refused(wait: float | None) -> TooManyRequestsError:
    """The answer to a refused request: ``wait`` seconds until the next one fits (rounded up,
    at least 1)."""
    return TooManyRequestsError(
        "Too many requests. Please retry later.", retry_after=math.ceil(wait or 1.0)
    )
