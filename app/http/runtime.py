"""What the lifespan builds and the routes use, kept on ``app.state.runtime``: the one place
the app's resources are found (``app.state`` holds nothing else of them)."""

from __future__ import annotations

from dataclasses import dataclass

from app.background import TaskRegistry
from app.chat.agent import ModelSetup
from app.chat.identity import IdentitySigner
from app.chat.runs import RunRegistry
from app.chat.server import ChatKitPgServer
from app.files.store import PgAttachmentStore
from app.http.auth import TokenVerifier
from app.http.drain import Drain
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
    # Per-user limits (None: off, as the soak run's A/B knob sets) and the attachments.
    limits: Limits | None = None
    attachments: PgAttachmentStore | None = None
    # The key signing MCP identity tokens (app.chat.identity; its JWKS route reads it here).
    identity: IdentitySigner | None = None
    # Resumable replies (app.chat.runs, docs/runs.md).
    runs: RunRegistry | None = None
    # SIGTERM's way out (app.http.drain): refuses new work, lets replies finish.
    drain: Drain | None = None
    # Whether PostgreSQL applies row-level security to our role; learnt by the first /readyz.
    row_security: bool | None = None
    # Replies this process is streaming now (for MAX_STREAMS_PER_PROCESS).
    open_streams: int = 0
