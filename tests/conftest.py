"""One fixture chooses the database; every test gets clean tables."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.pg.engine import create_engine
from app.pg.pool import ConnectionPool, open_pool
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness.pg import PgServer, header_line, migrate, postgres_server

# Helper modules whose assert statements check answers (pytest rewrites test modules only).
pytest.register_assert_rewrite("tests.harness.hostile_world", "tests.harness.hostile_cases")

TABLES = (
    "chatkit_feedback, chatkit_items, chatkit_attachments, chatkit_threads, "
    "chatkit_rate_limits, chatkit_stream_leases"
)


_PG = pytest.StashKey[tuple[ExitStack, PgServer]]()


def _session_server(config: pytest.Config) -> PgServer:
    """The session's PostgreSQL, started once, on first need: the report header (so it can
    name the server) or the first test that uses the database."""
    if _PG not in config.stash:
        stack = ExitStack()
        server = stack.enter_context(postgres_server())
        config.stash[_PG] = (stack, server)
    return config.stash[_PG][1]


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [header_line(_session_server(config))]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _PG in config.stash:
        stack, _ = config.stash[_PG]
        del config.stash[_PG]
        stack.close()


@pytest.fixture(scope="session")
def pg_server(pytestconfig: pytest.Config) -> PgServer:
    return _session_server(pytestconfig)


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


@pytest.fixture(scope="session")
async def pool(database_url: str, test_settings: Settings) -> AsyncIterator[ConnectionPool]:
    """The app's kind of pool (app.pg.pool) on the test database, for stores made by tests."""
    p = await open_pool(database_url, test_settings)
    yield p
    await p.close()


@pytest.fixture
async def store(pool: ConnectionPool, engine: AsyncEngine) -> AsyncIterator[PostgresStore]:
    yield PostgresStore(pool)
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.execute(f"TRUNCATE {TABLES} CASCADE")


# --- the application (server issue) --------------------------------------------------------

from collections.abc import Awaitable, Callable  # noqa: E402
from contextlib import AsyncExitStack  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from app.main import create_app  # noqa: E402
from tests.harness.chatkit_client import JWT_TEST_SECRET, ChatKitClient  # noqa: E402

MakeClient = Callable[..., Awaitable[ChatKitClient]]


@pytest.fixture
def app_settings(test_settings: Settings) -> Settings:
    """Settings for an app under test: a known HS256 secret, no delays, derived titles."""
    return test_settings.model_copy(
        update={
            "jwt_secret": SecretStr(JWT_TEST_SECRET),
            "offline_word_delay_seconds": 0.0,
            "thread_titles": "first_message",
            # The limiter runs on every request, with room for any test; tests of the
            # limits themselves set their own.
            "rate_limit_per_minute": 100_000,
        }
    )


@pytest.fixture
async def make_client(store: PostgresStore, app_settings: Settings) -> AsyncIterator[MakeClient]:
    """``await make_client(model=..., app_store=..., **settings)``: a started app behind an
    httpx client over ASGI (lifespan run). Apps stop, then the ``store`` fixture empties the
    tables."""
    async with AsyncExitStack() as stack:

        async def factory(
            model: Any = None, *, app_store: Any = None, **overrides: Any
        ) -> ChatKitClient:
            settings = app_settings.model_copy(update=overrides)
            app = create_app(settings, model=model, store=app_store)
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            http = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30)
            )
            return ChatKitClient(app, http, settings)

        yield factory


# CPython 3.11.7 can corrupt its AST recursion counter when the garbage collector finalizes
# objects while pytest parses a source file (gh-106905, fixed in 3.11.8), which then fails a
# whole run with "SystemError: AST constructor recursion depth mismatch". The agent and HTTP
# stacks leave cyclic garbage (tasks, coroutines), so it is collected at safe points: after
# every test, and before a failure report is built (pytest parses sources to render it).
import gc  # noqa: E402


@pytest.fixture(autouse=True)
def _collect_garbage_after_test() -> Iterator[None]:
    yield
    gc.collect()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    if call.excinfo is not None:
        gc.collect()
