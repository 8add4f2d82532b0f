"""What every store call and agent run knows about the request it serves."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Built by the endpoint from the verified token; the store scopes every row by ``user_id``."""

    user_id: str
    locale: str | None = None
    request_id: str = ""
