"""What the lifespan builds and the routes use, kept on ``app.state.runtime``."""

from __future__ import annotations

from dataclasses import dataclass

from .agent import ModelSetup
from .auth import TokenVerifier
from .background import TaskRegistry
from .limits import Limits
from .metered_store import MeteredStore
from .observability import Metrics
from .pool import ConnectionPool
from .server import ChatKitPgServer
from .settings import Settings


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
