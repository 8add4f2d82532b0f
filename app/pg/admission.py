"""A request's rate-limit admission, deferred so the store can fold it into the request's own
statement (app.pg.limits explains the limiter; app.http.endpoint decides which requests defer).

A list request (``threads.list``, ``items.list``) reads and changes nothing else, so it may be
admitted by the very statement that reads its page: the endpoint leaves a ``PendingAdmission``
in ``pending_admission``, ``PostgresStore._page`` runs the limiter's upsert and the page as one
statement and marks it consumed, and the endpoint admits the usual way afterwards only when
nothing consumed it (another store, a Citus cluster, an error before the store ran). Either
way the request counts once. Imported by app.pg.store, so it imports nothing of the app but
its errors.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass

from app.errors import TooManyRequestsError


@dataclass
class PendingAdmission:
    """One request's turn against ``user_id``'s budget: ``interval`` seconds per request and a
    ``burst`` of that many seconds (app.pg.limits' GCRA). ``consumed`` once it has been counted
    (admitted or refused), so that it never counts twice."""

    user_id: str
    interval: float
    burst: float
    consumed: bool = False


pending_admission: ContextVar[PendingAdmission | None] = ContextVar(
    "pending_admission", default=None
)
"""The admission the request being served in this context has not spent yet, if deferred."""


def pending_for(user_id: str) -> PendingAdmission | None:
    """The deferred admission of this context, when it is ``user_id``'s and not yet counted."""
    admission = pending_admission.get()
    if admission is None or admission.consumed or admission.user_id != user_id:
        return None
    return admission


def refused(wait: float | None) -> TooManyRequestsError:
    """The answer to a refused request: ``wait`` seconds until the next one fits (rounded up,
    at least 1)."""
    return TooManyRequestsError(
        "Too many requests. Please retry later.", retry_after=math.ceil(wait or 1.0)
    )
