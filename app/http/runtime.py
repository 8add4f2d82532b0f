"""What the lifespan builds and the routes use, kept on ``app.state.runtime``."""

from __future__ import annotations

from dataclasses import dataclass

from app.background import TaskRegistry
from app.chat.agent import ModelSetup
from app.chat.server import ChatKitPgServer
from app.http.auth import TokenVerifier
from app.observability import Metrics
from app.pg.limits import Limits
from app.pg.metered import MeteredStore
from app.pg.pool import ConnectionPool
from app.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics
    pool: ConnectionPool
    store: MeteredStore
    server: ChatKitPgServer
    verifier: TokenVerifier
    tasks: TaskRegistry
    model: ModelSetup
    alembic_heads: frozenset[str]
    # Per-user limits; None when the app runs over another store (benchmarks).
    limits: Limits | None = None
    # Whether PostgreSQL applies row-level security to our role; learnt by the first /readyz.
    row_security: bool | None = None
    # Replies this process is streaming now (for MAX_STREAMS_PER_PROCESS).
    open_streams: int = 0
