"""The database set-ups a shared suite runs on, chosen by a fixture parameter.

A test module (``pytestmark``) or a test marks ``@pytest.mark.backends(...)`` with names of
``BACKENDS``; tests/conftest.py parametrizes its module-scoped ``db_backend`` fixture from the
closest mark, and ``database_url``, ``store``, ``app_settings`` and the rest follow it. Unmarked
tests run on ``owner``. So "the store contract through the app's role" or "on Citus" is a
parameter of the same test functions, not a second copy of them.
"""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from tests.harness.pg import PgServer

BACKENDS = {
    "owner": "one node, as the tables' owner (bypasses row-level security)",
    "role": "one node, as the app's role (subject to row-level security), the pool's plan mode",
    "role-custom": "one node, as the app's role, every statement planned with its parameters",
    "role-generic": "one node, as the app's role, every statement on its generic plan",
    "citus": "a Citus cluster (tests/harness/citus.py), as the owner",
    "citus-role": "a Citus cluster, as the app's role (the policies checked on the workers)",
}
PLAN_MODES = {"role-custom": "force_custom_plan", "role-generic": "force_generic_plan"}

# Every table the app's role is granted (docs/rls.md), and those holding a user's content.
ROLE_TABLES = (
    "chatkit_threads",
    "chatkit_items",
    "chatkit_attachments",
    "chatkit_attachment_blobs",
    "chatkit_feedback",
    "chatkit_rate_limits",
    "chatkit_stream_leases",
    "chatkit_runs",
    "chatkit_run_events",
)
CONTENT_TABLES = ROLE_TABLES[:5]


def on_citus(backend: str) -> bool:
    return backend.startswith("citus")


def as_role(backend: str) -> bool:
    return backend.startswith("role") or backend == "citus-role"


async def create_app_role(database_url: str) -> tuple[str, str]:
    """A fresh LOGIN role without BYPASSRLS on ``database_url``'s server, with the rights
    docs/rls.md grants the app's role (a coordinator propagates them to its workers and shards).
    Returns (role, the database's URL as that role)."""
    role = f"ckpg_app_{secrets.token_hex(6)}"
    password = secrets.token_urlsafe(18)  # [A-Za-z0-9_-]: safe in a literal
    admin = await asyncpg.connect(PgServer.dsn(database_url))
    try:
        await admin.execute(
            f"CREATE ROLE {role} LOGIN PASSWORD '{password}' "
            "NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
        )
        await admin.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        await admin.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(ROLE_TABLES)} TO {role}"
        )
        await admin.execute(f"GRANT SELECT ON alembic_version TO {role}")
    finally:
        await admin.close()
    url = make_url(database_url).set(username=role, password=password)
    return role, url.render_as_string(hide_password=False)


async def drop_app_role(database_url: str, role: str) -> None:
    """Role names are cluster-wide: nothing of it may survive the run."""
    admin = await asyncpg.connect(PgServer.dsn(database_url))
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await admin.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
    finally:
        await admin.close()


async def empty_tables(owner_engine: Any, backend: str) -> None:
    """Empty every chatkit_ table through the owner's engine (which bypasses the policies):
    TRUNCATE on one node; on a cluster, DELETEs (tests/harness/citus.py says why)."""
    if on_citus(backend):
        from tests.harness.citus import empty_tables as empty_distributed

        await empty_distributed(owner_engine)
        return
    async with owner_engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.execute(f"TRUNCATE {', '.join(ROLE_TABLES)} CASCADE")


TABLES = ", ".join(ROLE_TABLES)
"""For ``TRUNCATE {TABLES} CASCADE`` by a test that empties the tables itself."""
