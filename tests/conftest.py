"""Fixtures every folder uses: the database server, the database a test runs on, the store, the
app, and the report header (the server chosen, the Hypothesis seed).

Which database: the module-scoped ``db_backend`` fixture, ``owner`` unless the test or its module
marks ``@pytest.mark.backends(...)`` (tests/harness/backends.py lists them). A marked test runs
once per backend named; ``database_url``, ``engine``, ``pool`` (both the owner's), ``store`` and
``app_settings`` (the app's role where the backend says so) follow it. Citus backends share one
cluster and one distributed database for the session, started on first need.
"""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, ExitStack
from typing import Any

import asyncpg
import httpx
import hypothesis
import pytest
from hypothesis import core as hypothesis_core
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from app.main import create_app
from app.pg.engine import create_engine
from app.pg.pool import ConnectionPool, open_pool
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness.backends import (
    BACKENDS,
    PLAN_MODES,
    as_role,
    create_app_role,
    drop_app_role,
    empty_tables,
    on_citus,
)
from tests.harness.chatkit_client import JWT_TEST_SECRET, ChatKitClient, MakeClient
from tests.harness.citus import CitusCluster, citus_cluster, distributed_database, require_citus
from tests.harness.pg import PgServer, header_line, migrate, postgres_server
from tests.harness.userdata import USER_TABLES, migrated_with_tasks

_PG = pytest.StashKey[tuple[ExitStack, PgServer]]()


def pytest_configure(config: pytest.Config) -> None:
    # Every Hypothesis test that is not derandomized (CI's profile derandomizes them all) draws
    # from this seed, printed in the header: ``--hypothesis-seed=<n>`` replays a run.
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = random.getrandbits(32)
        hypothesis_core.global_force_seed = config.option.hypothesis_seed


def _session_server(config: pytest.Config) -> PgServer:
    """The session's PostgreSQL, started once, on first need: the report header (so it can
    name the server) or the first test that uses the database."""
    if _PG not in config.stash:
        stack = ExitStack()
        server = stack.enter_context(postgres_server())
        config.stash[_PG] = (stack, server)
    return config.stash[_PG][1]


def pytest_report_header(config: pytest.Config) -> list[str]:
    seed = config.getoption("hypothesis_seed")
    replay = (
        "Hypothesis: derandomized (CI profile): the same examples every run"
        if hypothesis.settings.default.derandomize
        else f"Hypothesis: seed {seed} (replay with --hypothesis-seed={seed}; see docs/testing.md)"
    )
    return [header_line(_session_server(config)), replay]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _PG in config.stash:
        stack, _ = config.stash[_PG]
        del config.stash[_PG]
        stack.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is None or "db_backend" not in metafunc.fixturenames:
        return
    unknown = set(marker.args) - set(BACKENDS)
    assert not unknown, f"{metafunc.definition.nodeid}: unknown backends {unknown}"
    metafunc.parametrize("db_backend", marker.args, indirect=True, scope="module")


# --- the servers ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server(pytestconfig: pytest.Config) -> PgServer:
    return _session_server(pytestconfig)


@pytest.fixture(scope="session")
async def owner_database_url(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh database on the chosen server, migrated with Alembic (never create_all)."""
    url = await pg_server.create_database()
    await asyncio.to_thread(migrate, url)
    yield url
    await pg_server.drop_database(url)


@pytest.fixture(scope="module")
async def tasks_db(pg_server: PgServer, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A database of the module's own, migrated with the example task plugin's branch (the user
    data suites: export and erase reach the plugin's rows through its hooks)."""
    url = await migrated_with_tasks(pg_server, f"ckpg_{request.module.__name__.rsplit('.', 1)[-1]}")
    yield url
    await pg_server.drop_database(url)


@pytest.fixture
async def tasks_owner(tasks_db: str) -> AsyncIterator[asyncpg.Connection]:
    """The owner's connection to ``tasks_db``; every user's rows are gone after the test."""
    conn = await asyncpg.connect(PgServer.dsn(tasks_db))
    yield conn
    await conn.execute(f"TRUNCATE {', '.join(USER_TABLES)}, plugin_tasks CASCADE")
    await conn.close()


@pytest.fixture(scope="session")
def citus() -> Iterator[CitusCluster]:
    """A Citus cluster (coordinator and two workers) for the session; skips without Citus, and
    fails in CI."""
    require_citus()
    with citus_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
async def citus_database_url(citus: CitusCluster) -> str:
    """A database on the coordinator, migrated and distributed as an operator does."""
    return await distributed_database(citus)


# --- the backend and what follows it ---------------------------------------------------------


@pytest.fixture(scope="module")
def db_backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "owner"))


@pytest.fixture(scope="module")
def database_url(db_backend: str, request: pytest.FixtureRequest) -> str:
    """The backend's database, for its owner."""
    return str(
        request.getfixturevalue(
            "citus_database_url" if on_citus(db_backend) else "owner_database_url"
        )
    )


@pytest.fixture(scope="module")
def test_settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(database_url=database_url, data_dir=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
async def engine(database_url: str, test_settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The owner's engine: the tests' raw checks, which see every user's rows."""
    eng = create_engine(database_url, test_settings)
    yield eng
    await eng.dispose()


@pytest.fixture(scope="module")
async def pool(database_url: str, test_settings: Settings) -> AsyncIterator[ConnectionPool]:
    """The app's kind of pool (app.pg.pool) on the backend's database, as its owner."""
    p = await open_pool(database_url, test_settings)
    yield p
    await p.close()


@pytest.fixture(scope="module")
async def app_role_url(database_url: str, db_backend: str) -> AsyncIterator[str]:
    """The backend's database as a fresh app role (LOGIN, NOBYPASSRLS, docs/rls.md's rights).
    Dropped after the module on one node; a cluster goes with the session."""
    role, url = await create_app_role(database_url)
    yield url
    if not on_citus(db_backend):
        await drop_app_role(database_url, role)


@pytest.fixture(scope="module")
def store_url(db_backend: str, database_url: str, request: pytest.FixtureRequest) -> str:
    """Where the store and the app connect: the app's role for a role backend."""
    return str(request.getfixturevalue("app_role_url")) if as_role(db_backend) else database_url


@pytest.fixture(scope="module")
async def store_pool(
    db_backend: str, store_url: str, pool: ConnectionPool, test_settings: Settings
) -> AsyncIterator[ConnectionPool]:
    if store_url == test_settings.database_url:
        yield pool
        return
    mode = PLAN_MODES.get(db_backend)
    own = await open_pool(
        store_url, test_settings, session={"plan_cache_mode": mode} if mode else None
    )
    yield own
    await own.close()


@pytest.fixture
async def store(
    store_pool: ConnectionPool, engine: AsyncEngine, db_backend: str
) -> AsyncIterator[PostgresStore]:
    """The store on the backend; the owner empties the tables after the test."""
    yield PostgresStore(store_pool)
    await empty_tables(engine, db_backend)


@pytest.fixture
async def pooled_store(
    store_url: str, test_settings: Settings, engine: AsyncEngine, db_backend: str
) -> AsyncIterator[PostgresStore]:
    """A store whose pool holds one connection, in the pool's default plan mode: every call,
    and every raw statement on it, runs on the same server session (on a cluster, the same
    sessions on the workers too)."""
    one = test_settings.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0})
    app_pool = await open_pool(store_url, one)
    yield PostgresStore(app_pool)
    await app_pool.close()
    await empty_tables(engine, db_backend)


# --- the application ---------------------------------------------------------------------------


@pytest.fixture
def app_settings(test_settings: Settings, store_url: str) -> Settings:
    """Settings for an app under test: a known HS256 secret, no delays, derived titles, the
    backend's connection."""
    return test_settings.model_copy(
        update={
            "database_url": store_url,
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


# --- garbage ------------------------------------------------------------------------------------
#
# CPython 3.11.7 can corrupt its AST recursion counter when the garbage collector finalizes
# objects while pytest parses a source file (gh-106905, fixed in 3.11.8), which then fails a
# whole run with "SystemError: AST constructor recursion depth mismatch". The agent and HTTP
# stacks leave cyclic garbage (tasks, coroutines), so it is collected at safe points: after
# every test, and before a failure report is built (pytest parses sources to render it).


@pytest.fixture(autouse=True)
def _collect_garbage_after_test() -> Iterator[None]:
    yield
    gc.collect()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    if call.excinfo is not None:
        gc.collect()
