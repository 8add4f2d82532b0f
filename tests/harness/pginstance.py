"""A private PostgreSQL that a test may stop, start and restart: its own data directory and
Unix socket in a short temporary folder, run with the embedded server's binaries
(``app.pg.embedded``: a bundled wheel's, or the machine's).

Never the session's shared server (tests/harness/pg.py): other tests keep using that one while
this one goes down. As root, PostgreSQL refuses to run, so, as the embedded server does, the
cluster is made and run by an unprivileged system user (created if missing) who is given the
folder. Every process this module starts is a postmaster of its own data directory; ``cleanup``
stops it (by ``pg_ctl``, or by its pid from ``postmaster.pid`` when that fails) and deletes the
folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from app.pg.embedded import SYSTEM_USER, Binaries, Cluster, grant_access, locate_binaries

PORT = 5432  # only names the socket file; nothing listens on TCP
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; ".s.PGSQL.5432" comes after the folder


@cache
def embedded_binaries() -> Binaries:
    """The binaries the app's embedded server would use here (``EMBEDDED_POSTGRES_BIN`` too)."""
    configured = os.environ.get("EMBEDDED_POSTGRES_BIN", "").strip()
    return locate_binaries(Path(configured) if configured else None)


def embedded_bin_dir() -> Path:
    return embedded_binaries().bin_dir


def _short_temp_root() -> Path:
    base = tempfile.gettempdir()
    if len(base) > 40 and Path("/tmp").is_dir():
        base = "/tmp"
    root = Path(tempfile.mkdtemp(prefix="ckpg-pg-", dir=base))
    assert len(str(root / "run" / f".s.PGSQL.{PORT}")) < SOCKET_PATH_MAX, root
    return root


class PgInstance(Cluster):
    """A cluster laid out in one temporary ``root``: ``data/``, ``run/`` (the socket) and the
    log beside them."""

    def __init__(
        self,
        root: Path,
        system_user: str | None,
        bin_dir: Path | None = None,
        port: int = PORT,
        listen: str = "",
        options: str = "",
    ) -> None:
        super().__init__(
            root / "data",
            root / "run",
            bin_dir or embedded_bin_dir(),
            system_user,
            port=port,
            listen=listen,
            options=options,
        )
        self.root = root

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

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


def _prepare_for(user: str, root: Path, bin_dir: Path | None = None) -> None:
    """As root: ``user`` owns ``root`` and may run the binaries."""
    grant_access(user, [root], bin_dir or embedded_bin_dir())


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
