"""``python -m app users export|erase`` as an operator runs them (a real process, a real
database with the example task plugin): the archive on disk, erase's printed counts, dry run,
idempotence, a missing user, and clear one-line errors for bad arguments."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from app.cli.commands import build_parser
from app.cli.users import cmd_users as users_command
from app.settings import PROJECT_ROOT, get_settings
from tests.harness.userdata import (
    TASKS_PLUGIN,
    assert_empty,
    assert_matches,
    read_archive,
    row_counts,
    seed_user,
)


async def users(tasks_db: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "PRODUCTION"))}
    env |= {"DATABASE_URL": tasks_db, "DATA_DIR": str(tmp_path), "CHATKIT_PLUGINS": TASKS_PLUGIN}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "app", "users", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )


async def test_export_erase_export(
    tasks_db: str,
    tasks_owner: asyncpg.Connection,
    tmp_path: Path,
    env_database: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice = await seed_user(tasks_owner, "alice")
    await seed_user(tasks_owner, "bob")
    bob = await row_counts(tasks_owner, "bob")
    out = tmp_path / "alice.zip"

    done = await users(tasks_db, tmp_path, "export", "--sub", "alice", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert_matches(read_archive(out.read_bytes()), alice)
    assert b"exported user 'alice'" in done.stderr and b"3 threads, 15 items" in done.stderr
    assert not list(tmp_path.glob("*.partial"))

    dry = await users(tasks_db, tmp_path, "erase", "--sub", "alice", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    counted = json.loads(dry.stdout)
    assert counted["dry_run"] is True
    assert counted["groups"]["conversations"]["chatkit_items"] == 15
    assert counted["groups"]["plugin tasks"] == {"plugin_tasks": 2}
    assert (await row_counts(tasks_owner, "alice"))["chatkit_items"] == 15  # nothing removed

    erased = await users(tasks_db, tmp_path, "erase", "--sub", "alice")
    assert erased.returncode == 0, erased.stderr
    lines = erased.stdout.decode().splitlines()
    assert lines[0] == "deleted for user 'alice':"
    assert "  conversations: chatkit_items 15 rows" in lines
    assert "  limits: chatkit_rate_limits 1 rows" in lines
    assert "  plugin tasks: plugin_tasks 2 rows" in lines
    assert set((await row_counts(tasks_owner, "alice")).values()) == {0}
    assert await row_counts(tasks_owner, "bob") == bob

    # The rest in this process (each interpreter start costs seconds): the same dispatch.
    env_database(tasks_db)
    assert await asyncio.to_thread(run_in_process, "erase", "--sub", "alice") == 0
    said = capsys.readouterr()
    assert said.out.strip() == "no data stored for user 'alice': nothing to delete"

    empty = tmp_path / "empty.zip"
    assert (
        await asyncio.to_thread(run_in_process, "export", "--sub", "alice", "--out", str(empty))
        == 0
    )
    assert "no data stored for user 'alice': wrote an empty archive" in capsys.readouterr().err
    assert_empty(read_archive(empty.read_bytes()), "alice")


async def test_export_to_standard_output(
    tasks_db: str, tasks_owner: asyncpg.Connection, tmp_path: Path
) -> None:
    alice = await seed_user(tasks_owner, "alice", threads=1)
    done = await users(tasks_db, tmp_path, "export", "--sub", "alice", "--out", "-")
    assert done.returncode == 0, done.stderr
    assert_matches(read_archive(done.stdout), alice)


def run_in_process(*argv: str) -> int:
    """The command as ``python -m app`` dispatches it, in this process: for the cases that
    need no second interpreter (its start-up costs seconds)."""
    args = build_parser().parse_args(["users", *argv])
    return users_command(args)


@pytest.fixture
def env_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    def use(url: str) -> None:
        monkeypatch.setenv("DATABASE_URL", url)
        monkeypatch.setenv("CHATKIT_PLUGINS", TASKS_PLUGIN)
        get_settings.cache_clear()

    yield use
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("export", "--sub", " ", "--out", "x.zip"), "--sub must name a user"),
        (("erase", "--sub", ""), "--sub must name a user"),
        (("erase", "--sub", "a" * 256), "--sub has at most 255 characters"),
        (("erase", "--sub", "a\x00b"), "--sub may not contain NUL"),
        (("export", "--sub", "a", "--out", "exists.zip"), "exists; choose another name or add"),
        (("export", "--sub", "a", "--out", "no/such/dir/a.zip"), "does not exist"),
        (("export", "--sub", "a", "--out", "."), "is a directory"),
    ],
)
def test_bad_arguments_are_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], says: str
) -> None:
    (tmp_path / "exists.zip").write_bytes(b"keep me")
    args = tuple(str(tmp_path / a) if a.endswith(".zip") or a == "." else a for a in args)
    assert run_in_process(*args) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "exists.zip").read_bytes() == b"keep me"


def test_force_replaces_an_existing_file(
    tasks_db: str, env_database: Callable[[str], None], tmp_path: Path
) -> None:
    env_database(tasks_db)
    out = tmp_path / "a.zip"
    out.write_bytes(b"old")
    assert run_in_process("export", "--sub", "nobody", "--out", str(out), "--force") == 0
    assert_empty(read_archive(out.read_bytes()), "nobody")


def test_a_missing_database_is_one_line(
    tasks_db: str,
    env_database: Callable[[str], None],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env_database(make_url(tasks_db).set(database="ckpg_users_none").render_as_string(False))
    out = tmp_path / "a.zip"
    assert run_in_process("export", "--sub", "alice", "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("users export: failed (InvalidCatalogNameError: "), err
    assert not out.exists() and not list(tmp_path.iterdir())  # no partial file left
