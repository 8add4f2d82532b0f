"""Choose a real PostgreSQL for tests and benchmarks, and make throwaway databases on it.

Order: ``TEST_DATABASE_URL`` → a testcontainers container (``TEST_POSTGRES_IMAGE``) when a
Docker engine answers → the embedded PostgreSQL (``app.pg.embedded``) in a temporary folder. A container
that cannot start (offline, no image, registry limits) falls back to the embedded server, and
the report header says so with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
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
    kind: str  # "TEST_DATABASE_URL", "testcontainers <image>" or "embedded"
    note: str = ""  # why a preferred kind was not used (said once, in the report header)
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


def postgres_image() -> str:
    """``TEST_POSTGRES_IMAGE``: the image testcontainers starts (CI builds a local one)."""
    return os.environ.get("TEST_POSTGRES_IMAGE", "").strip() or POSTGRES_IMAGE


def _reason(exc: BaseException) -> str:
    """One line for the report header: the first line of the error, bounded."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@contextlib.contextmanager
def _container(image: str) -> Iterator[PgServer]:
    from testcontainers.community.postgres import PostgresContainer

    container = PostgresContainer(image, driver="asyncpg")
    try:
        container.start()
    except BaseException:
        # A container that was created but never became ready must not outlive the session.
        with contextlib.suppress(Exception):
            container.stop()
        raise
    try:
        yield PgServer(container.get_connection_url(), f"testcontainers {image}")
    finally:
        container.stop()


@contextlib.contextmanager
def _embedded(note: str = "") -> Iterator[PgServer]:
    """The app's embedded server (``app.pg.embedded``: the same binaries ``make run`` uses) in a
    temporary folder."""
    from app.pg.embedded import EmbeddedServer
    from tests.harness.pginstance import embedded_binaries

    with tempfile.TemporaryDirectory(prefix="ckpg-pg-") as tmp:
        server = EmbeddedServer(Path(tmp) / "postgres", embedded_binaries())
        try:
            url = normalise_database_url(server.ensure_running())
            yield PgServer(url, f"embedded {server.binaries.describe()}", note=note)
        finally:
            server.stop()


@contextlib.contextmanager
def postgres_server() -> Iterator[PgServer]:
    url = os.environ.get("TEST_DATABASE_URL", "").strip()
    if url:
        yield PgServer(normalise_database_url(url), "TEST_DATABASE_URL")
        return
    with contextlib.ExitStack() as stack:
        server: PgServer | None = None
        note = ""
        if _docker_answers():
            image = postgres_image()
            try:
                server = stack.enter_context(_container(image))
            except Exception as exc:
                # Offline, a registry limit, no such image: the suite still runs, and says why.
                note = f"testcontainers could not start {image} ({_reason(exc)})"
        if server is None:
            server = stack.enter_context(_embedded(note))
        yield server


def server_version(server: PgServer) -> str:
    """The server's own version string (``SHOW server_version``), for the report header."""

    async def ask() -> str:
        conn = await asyncpg.connect(server.dsn(server.admin_url))
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    return asyncio.run(ask())


def header_line(server: PgServer) -> str:
    line = f"PostgreSQL: {server.kind}, server {server_version(server)}"
    return f"{line}; {server.note}" if server.note else line


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
