"""Fixtures shared by HTTP suites: a TCP proxy between an app and its database
(tests/harness/tcpproxy.py: test_faults.py, test_runs_faults.py), and two backend processes on
one database for the resumable replies (tests/harness/runpair.py: test_runs.py,
test_runs_thread.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.harness.deploy import Backend
from tests.harness.pg import PgServer
from tests.harness.runpair import Pair, backend_env, start_all
from tests.harness.tcpproxy import TcpProxy


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    """List it before ``make_client``: the proxy then outlives the apps, which stop first.
    Tests that stall it resume it themselves (in ``finally``), before their app stops."""
    url = make_url(database_url)
    # The embedded server listens on a Unix socket only: its URL names the socket directory.
    socket_dir = url.query.get("host")
    host = socket_dir if isinstance(socket_dir, str) else url.host or "127.0.0.1"
    async with TcpProxy(host, url.port or 5432) as tcp:
        yield tcp


@pytest.fixture
def via_proxy(database_url: str, proxy: TcpProxy) -> str:
    """The test database's URL, through the proxy."""
    url = make_url(database_url).difference_update_query(["host"])
    url = url.set(host="127.0.0.1", port=proxy.port)
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def backends(store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Backend]]:
    """Two processes as the backend's app connects (on a Citus cluster, as the app's role: the
    run log's functions run on the user's worker, under its policies)."""
    folder = tmp_path_factory.mktemp("runs")
    env = backend_env(folder, tmp_path_factory.getbasetemp().parent)
    pair = [Backend(database_url=store_url, extra_env=dict(env)) for _ in range(2)]
    try:
        start_all(pair, folder, "backend")
        yield pair
    finally:
        for backend in pair:
            backend.stop()


@pytest.fixture
async def two(backends: list[Backend], database_url: str) -> AsyncIterator[Pair]:
    async with contextlib.AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=x.url, timeout=30))
            for x in backends
        ]
        yield Pair(a, b, PgServer.dsn(database_url), backends)
