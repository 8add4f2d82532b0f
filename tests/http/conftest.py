"""Fixtures of the HTTP suites that put a TCP proxy between an app and its database
(tests/harness/tcpproxy.py): test_faults.py and test_runs_faults.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.engine import make_url

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
