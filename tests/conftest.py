"""One fixture chooses the database; every test gets clean tables."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import create_engine
from app.settings import Settings
from app.store import PostgresStore
from tests.pgharness import PgServer, migrate, postgres_server

TABLES = "chatkit_feedback, chatkit_items, chatkit_attachments, chatkit_threads"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    with postgres_server() as server:
        print(f"\n[tests] PostgreSQL from {server.kind}")
        yield server


@pytest.fixture(scope="session")
async def database_url(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh database on the chosen server, migrated with Alembic (never create_all)."""
    url = await pg_server.create_database()
    await asyncio.to_thread(migrate, url)
    yield url
    await pg_server.drop_database(url)


@pytest.fixture(scope="session")
def test_settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(database_url=database_url, data_dir=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
async def engine(database_url: str, test_settings: Settings) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(database_url, test_settings)
    yield eng
    await eng.dispose()


@pytest.fixture
async def store(engine: AsyncEngine) -> AsyncIterator[PostgresStore]:
    yield PostgresStore(engine)
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.execute(f"TRUNCATE {TABLES} CASCADE")
