"""A real Citus cluster for tests and benchmarks: a coordinator and two workers on this machine.

Citus is not packaged for this Debian; .ci/citus.sh builds it from the vendored source release
into the machine's PostgreSQL 15 (the embedded pgserver PostgreSQL has no server headers). Each
node is a private ``initdb`` directory run with ``pg_ctl`` (tests/harness/pginstance.py, with the
machine's binaries), listening on 127.0.0.1 at a port of 56000-56099 (the nodes reach each other
over TCP) and on its own Unix socket. ``citus_cluster`` stops every node and deletes its folder on
the way out, even after a failure.

A database on the cluster (``CitusCluster.create_database``) exists on every node with the
``citus`` extension, the coordinator knowing the workers: what an operator sets up before
``alembic upgrade head`` and ``python -m app distribute``.

Without Citus, a test that needs it skips with the reason, except in CI (``CI`` set), where it
fails: .ci/run builds Citus first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import app.pg.sql as pg_sql
import app.pg.store as store_sql
from tests.harness.pginstance import SYSTEM_USER, PgInstance, _prepare_for, _short_temp_root
from tests.harness.statements import literal, statements

PG_BIN = Path(os.environ.get("CITUS_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_LIB = PG_BIN.parent / "lib"
PORTS = range(56000, 56100)
WORKERS = 2
# Small and fast, never durable: these clusters live for one test run.
NODE_OPTIONS = (
    "-c shared_preload_libraries=citus -c fsync=off -c synchronous_commit=off "
    "-c full_page_writes=off -c max_connections=200 -c max_prepared_transactions=100 "
    # The nodes run as another user than the tests (root's ~/.postgresql is not theirs): no TLS.
    "-c citus.node_conninfo=sslmode=disable"
)


def citus_missing() -> str | None:
    """Why a cluster cannot be made here, or None."""
    if not (PG_BIN / "pg_ctl").is_file():
        return f"PostgreSQL 15 binaries not found in {PG_BIN}"
    if not (PG_LIB / "citus.so").is_file():
        return f"Citus is not installed ({PG_LIB}/citus.so missing; .ci/citus.sh builds it)"
    return None


def require_citus() -> None:
    """Skip the calling test without Citus; in CI, fail it (a missing part must not hide)."""
    reason = citus_missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run must run .ci/citus.sh before the tests")
    pytest.skip(f"{reason}; CI builds it and runs this")


def _free_ports(count: int) -> list[int]:
    """``count`` ports of 56000-56099 that nothing listens on right now."""
    found = []
    for port in PORTS:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError("no free ports in 56000-56099 for a Citus cluster")


@dataclass
class CitusCluster:
    coordinator: PgInstance
    workers: list[PgInstance]

    @property
    def nodes(self) -> list[PgInstance]:
        return [self.coordinator, *self.workers]

    @staticmethod
    def tcp_dsn(node: PgInstance, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{node.port}/{database}"

    def url(self, database: str) -> str:
        """The app's URL of ``database`` on the coordinator (SQLAlchemy asyncpg form)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.coordinator.port}/{database}"

    def worker_dsn(self, index: int, database: str) -> str:
        return self.tcp_dsn(self.workers[index], database)

    async def create_database(self, prefix: str = "ckpg_citus", *, citus: bool = True) -> str:
        """A new database on every node; with ``citus``, the extension in each and the workers
        added to the coordinator's metadata. Returns the coordinator's URL of it."""
        name = f"{prefix}_{secrets.token_hex(5)}"
        for node in (*self.workers, self.coordinator):
            admin = await asyncpg.connect(self.tcp_dsn(node))
            try:
                await admin.execute(f'CREATE DATABASE "{name}"')
            finally:
                await admin.close()
            if citus:
                conn = await asyncpg.connect(self.tcp_dsn(node, name))
                try:
                    await conn.execute("CREATE EXTENSION citus")
                finally:
                    await conn.close()
        if citus:
            conn = await asyncpg.connect(self.tcp_dsn(self.coordinator, name))
            try:
                await conn.execute(
                    "SELECT citus_set_coordinator_host('127.0.0.1', $1)", self.coordinator.port
                )
                for worker in self.workers:
                    await conn.execute("SELECT citus_add_node('127.0.0.1', $1)", worker.port)
            finally:
                await conn.close()
        return self.url(name)


@contextlib.contextmanager
def citus_cluster(workers: int = WORKERS) -> Iterator[CitusCluster]:
    """A started coordinator and ``workers`` workers; all stopped and deleted on the way out."""
    reason = citus_missing()
    if reason is not None:
        raise RuntimeError(reason)
    system_user = SYSTEM_USER if os.geteuid() == 0 else None
    ports = _free_ports(workers + 1)
    nodes: list[PgInstance] = []
    try:
        for port in ports:
            root = _short_temp_root()
            node = PgInstance(
                root, system_user, bin_dir=PG_BIN, port=port, listen="127.0.0.1",
                options=NODE_OPTIONS,
            )  # fmt: skip
            nodes.append(node)
            if system_user is not None:
                _prepare_for(system_user, root, PG_BIN)
            node.socket_dir.mkdir()
            if system_user is not None:
                shutil.chown(node.socket_dir, system_user, system_user)
            node.init()
        for node in nodes:
            node.start()
        yield CitusCluster(nodes[0], nodes[1:])
    finally:
        for node in nodes:
            node.cleanup()


# --- databases on a cluster (tests/conftest.py starts the session's cluster) ----------------


async def distributed_database(cluster: CitusCluster) -> str:
    """A new database on ``cluster`` as an operator makes it: ``alembic upgrade head``, then
    ``python -m app distribute`` (its function; tests/citus/test_citus.py runs the command itself)."""
    from app.cli.distribute import distribute, plain_dsn
    from tests.harness.pg import migrate

    url = await cluster.create_database()
    await asyncio.to_thread(migrate, url)
    await distribute(plain_dsn(url))
    return url


async def worker_fetch(cluster: CitusCluster, index: int, database: str, sql: str) -> list[Any]:
    """Rows of ``sql`` run directly on one worker (as the superuser), bypassing the coordinator."""
    conn = await asyncpg.connect(cluster.worker_dsn(index, database))
    try:
        # Citus hides shards from pg_class on workers unless asked not to.
        await conn.execute("SET citus.override_table_visibility = off")
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


# Deleting is what a test's few rows need: TRUNCATE on distributed tables takes every shard's
# lock on every node and costs half a second; these DELETEs cost milliseconds. Deleting a
# thread cascades to its items, feedback, attachments and their bytes.
EMPTY_TABLES = (
    "BEGIN; DELETE FROM chatkit_threads; DELETE FROM chatkit_attachments; DELETE FROM chatkit_runs; "
    "DELETE FROM chatkit_rate_limits; DELETE FROM chatkit_stream_leases; COMMIT"
)


async def empty_tables(owner_engine: Any) -> None:
    """Empty every chatkit_ table, through the owner's engine (which bypasses the policies)."""
    async with owner_engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.execute(EMPTY_TABLES)


# --- plans on a cluster (tests/citus/test_citus.py, bench/citus_bench.py) ----------------------


def find_all(node: Any, key: str) -> list[Any]:
    """Every value of ``key`` anywhere in a JSON plan."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            found += find_all(v, key)
    elif isinstance(node, list):
        for v in node:
            found += find_all(v, key)
    return found


async def explain(
    conn: asyncpg.Connection, sql: str, args: tuple[Any, ...], which: str = "first"
) -> dict[str, Any]:
    """The JSON plan of ``sql`` prepared and EXPLAIN EXECUTEd: the first, or the seventh."""
    literals = [await literal(conn, a) for a in args]
    await conn.execute(f"PREPARE citus_check AS {sql}")
    try:
        for _ in range(7 if which == "settled" else 1):
            text = await conn.fetchval(
                f"EXPLAIN (VERBOSE, FORMAT JSON) EXECUTE citus_check({', '.join(literals)})"
            )
    finally:
        await conn.execute("DEALLOCATE citus_check")
    plan: dict[str, Any] = json.loads(text)[0]
    return plan


def single_shard(plan: dict[str, Any]) -> bool:
    """One Citus task, and no subplan evaluated on the coordinator before it."""
    root = plan["Plan"]
    return (
        root.get("Custom Plan Provider") == "Citus Adaptive"
        and find_all(plan, "Task Count") == [1]
        and not find_all(plan, "Subplans")
    )


def citus_statements() -> dict[str, tuple[str, tuple[Any, ...]]]:
    """tests/harness/statements.py's list of every statement with sample arguments, each write in the
    form the store sends to a cluster."""
    out: dict[str, tuple[str, tuple[Any, ...]]] = {}
    for name, (sql, args) in statements().items():
        writes = sql.split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE")
        if name == "store.SQL_SAVE_FEEDBACK":
            sql, args = store_sql.CITUS_SAVE_FEEDBACK_ROW, (*args[:2], args[2][0], args[3])
        elif writes and not name.startswith("limits."):
            assert sql in pg_sql.CITUS_FORMS, f"{name} has no Citus form"
            sql = pg_sql.CITUS_FORMS[sql]
        out[name] = (sql, args)
    return out
