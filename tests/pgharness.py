"""Choose a real PostgreSQL for tests and benchmarks, and make throwaway databases on it.

Order: ``TEST_DATABASE_URL`` → a testcontainers container when a Docker engine answers →
the embedded ``pgserver`` PostgreSQL in a temporary folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

from app.settings import PROJECT_ROOT, normalise_database_url

log = logging.getLogger(__name__)

POSTGRES_IMAGE = "postgres:16.4-alpine"


@dataclass
class PgServer:
    """A server we may create databases on; ``kind`` says which of the three it is."""

    admin_url: str  # postgresql+asyncpg URL of a maintenance database
    kind: str
    _created: list[str] = field(default_factory=list)

    def url_for(self, database: str) -> str:
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)

    @staticmethod
    def dsn(url: str) -> str:
        """The libpq spelling of an SQLAlchemy URL, for plain asyncpg."""
        return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)

    async def create_database(self, prefix: str = "ckpg_test") -> str:
        name = f"{prefix}_{secrets.token_hex(6)}"
        conn = await asyncpg.connect(self.dsn(self.admin_url))
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self._created.append(name)
        return self.url_for(name)

    async def drop_database(self, url: str) -> None:
        name = make_url(url).database
        conn = await asyncpg.connect(self.dsn(self.admin_url))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        with contextlib.suppress(ValueError):
            self._created.remove(str(name))

    async def drop_all(self) -> None:
        for name in list(self._created):
            await self.drop_database(self.url_for(name))


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def postgres_server() -> Iterator[PgServer]:
    url = os.environ.get("TEST_DATABASE_URL", "").strip()
    if url:
        yield PgServer(normalise_database_url(url), "TEST_DATABASE_URL")
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer(POSTGRES_IMAGE, driver="asyncpg") as pg:
            yield PgServer(pg.get_connection_url(), "testcontainers")
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="ckpg-pg-") as tmp:
        server = pgserver.get_server(tmp, cleanup_mode="delete")
        try:
            yield PgServer(normalise_database_url(server.get_uri()), "embedded")
        finally:
            server.cleanup()


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url
    cfg.attributes["skip_logging_config"] = True
    return cfg


def migrate(database_url: str, revision: str = "head") -> None:
    """Blocking (alembic's env runs its own event loop): call from a thread in async code."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def describe(server: PgServer) -> dict[str, Any]:
    return {"kind": server.kind, "url": make_url(server.admin_url).render_as_string()}
