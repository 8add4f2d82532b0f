"""A private PostgreSQL that a test may stop, start and restart: its own data directory and
Unix socket in a short temporary folder, run with the binaries the ``pgserver`` package bundles.

Never the session's shared server (tests/pgharness.py): other tests keep using that one while
this one goes down. As root, PostgreSQL refuses to run, so, like ``pgserver`` itself does, the
cluster is made and run by an unprivileged system user (``pgserver``, created if missing) and
the binaries are made readable and executable for it. Every process this module starts is a
postmaster of its own data directory; ``cleanup`` stops it (by ``pg_ctl``, or by its pid from
``postmaster.pid`` when that fails) and deletes the folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgserver._commands import POSTGRES_BIN_PATH

SYSTEM_USER = "pgserver"  # the user pgserver runs PostgreSQL as when started by root
PORT = 5432  # only names the socket file; nothing listens on TCP
PG_CTL_TIMEOUT = 30  # seconds pg_ctl may wait for a start or a stop
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; ".s.PGSQL.5432" comes after the folder


def _short_temp_root() -> Path:
    base = tempfile.gettempdir()
    if len(base) > 40 and Path("/tmp").is_dir():
        base = "/tmp"
    root = Path(tempfile.mkdtemp(prefix="ckpg-pg-", dir=base))
    assert len(str(root / "run" / f".s.PGSQL.{PORT}")) < SOCKET_PATH_MAX, root
    return root


@dataclass
class PgInstance:
    root: Path
    system_user: str | None  # who runs PostgreSQL; None: the current user
    # Another PostgreSQL's binaries (tests/citusharness.py: the machine's, which have Citus).
    bin_dir: Path = POSTGRES_BIN_PATH
    port: int = PORT
    # "127.0.0.1" to listen on TCP ``port`` too (cluster nodes reach each other that way).
    listen: str = ""
    options: str = ""  # more ``-c name=value`` server options

    @property
    def pgdata(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        """An SQLAlchemy asyncpg URL (the form the app's settings take)."""
        return f"postgresql+asyncpg://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def dsn(self, database: str = "postgres") -> str:
        """The same, for plain asyncpg."""
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    # --- commands ---------------------------------------------------------------------------

    def _run(self, tool: str, *args: str, timeout: float = PG_CTL_TIMEOUT) -> str:
        """Run a bundled binary as the server's user. Output goes to a file, not a pipe: a
        postmaster started by pg_ctl would inherit the pipe and keep it open."""
        kwargs: dict[str, Any] = {}
        if self.system_user is not None:
            kwargs["user"] = self.system_user
        with tempfile.TemporaryFile("w+") as out:
            result = subprocess.run(
                [str(self.bin_dir / tool), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                timeout=timeout,
                cwd=self.root,
                check=False,
                **kwargs,
            )
            out.seek(0)
            output = out.read()
        if result.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} exited with {result.returncode}:\n{output}\n"
                f"--- server log ---\n{self.server_log()}"
            )
        return output

    def server_log(self, tail: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no log)"

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.pgdata),
            "-U",
            "postgres",
            "--auth=trust",
            "--auth-local=trust",
            "--encoding=utf8",
            "--no-sync",
        )

    def start(self) -> None:
        """Start the postmaster and return once it accepts connections (``pg_ctl -w``)."""
        options = f"-c listen_addresses='{self.listen}' -k {self.socket_dir} -p {self.port}"
        if self.options:
            options += f" {self.options}"
        self._run(
            "pg_ctl",
            "-D",
            str(self.pgdata),
            "-l",
            str(self.log_file),
            "-o",
            options,
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT),
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """``fast``: every backend is terminated (open transactions rolled back), then the
        postmaster exits; returns once it has."""
        self._run(
            "pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "-t", str(PG_CTL_TIMEOUT), "stop"
        )

    def restart(self, mode: str = "fast") -> None:
        """Stop as ``stop`` does, then start again with the same options."""
        self._run(
            "pg_ctl",
            "-D",
            str(self.pgdata),
            "-l",
            str(self.log_file),
            "-m",
            mode,
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT),
            "restart",
        )

    def is_ready(self) -> bool:
        """``pg_isready``: whether the server accepts connections right now."""
        try:
            self._run(
                "pg_isready", "-h", str(self.socket_dir), "-p", str(self.port), "-t", "1", timeout=5
            )
        except RuntimeError:
            return False
        return True

    def postmaster_pid(self) -> int | None:
        """The pid in ``postmaster.pid`` if that process is alive, else None."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def cleanup(self) -> None:
        """Stop the server (whatever state a failed test left it in) and delete the folder."""
        pid = self.postmaster_pid()
        if pid is not None:
            try:
                self.stop("immediate")
            except Exception:
                # This postmaster is ours: its pid comes from our own data directory.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)
                deadline = time.monotonic() + 10
                while self.postmaster_pid() == pid and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self.postmaster_pid() == pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def _prepare_for(user: str, root: Path) -> None:
    """What pgserver does before running PostgreSQL as ``user`` (it is root that calls)."""
    import pwd
    import stat

    from pgserver.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(user)
    ensure_prefix_permissions(root)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, execute | read)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
    entry = pwd.getpwnam(user)
    os.chown(root, entry.pw_uid, entry.pw_gid)


@contextlib.contextmanager
def private_postgres() -> Iterator[PgInstance]:
    """A started private PostgreSQL; stopped and deleted on the way out, even after a failure."""
    root = _short_temp_root()
    system_user = SYSTEM_USER if os.geteuid() == 0 else None
    instance = PgInstance(root, system_user)
    try:
        if system_user is not None:
            _prepare_for(system_user, root)
        instance.socket_dir.mkdir()
        if system_user is not None:
            shutil.chown(instance.socket_dir, system_user, system_user)
        instance.init()
        instance.start()
        yield instance
    finally:
        instance.cleanup()
