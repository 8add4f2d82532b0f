"""Freeze a private PostgreSQL (tests/harness/pginstance.py) the way a hung host or a stalled disk does:
``SIGSTOP`` on the postmaster and every process it started (backends, checkpointer, ...), and
``SIGCONT`` afterwards, whatever the test did in between.

A frozen server keeps its sockets open: the kernel still completes new connections into the
listen queue and accepts what a client writes, but nothing answers. No error, no reset, no
end of file: only the client's own deadlines end a wait. That is what asyncpg's cancellation
meets too: its cancel request goes out on a new connection that is accepted and never read.

Only ever pass a ``PgInstance`` the test owns: the processes signalled are the children of the
pid in its own ``postmaster.pid``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from tests.harness.pginstance import PgInstance

STOP_SECONDS = 10.0  # a process not seen stopped after this long fails the test


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process, from ``/proc/<pid>/stat``; None once it is gone.
    The command name (field 2) may hold spaces and parentheses: split after its last ``)``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == pid:
                found.append(int(entry))
    return found


def _wait_stopped(pid: int) -> None:
    """Return once ``pid`` is stopped (state ``T``) or gone (a zombie, ``Z``, exited before
    its stopped parent could reap it): ``kill`` only queues the signal."""
    deadline = time.monotonic() + STOP_SECONDS
    while True:
        stat = _stat(pid)
        if stat is None or stat[0] in ("T", "t", "Z", "X"):
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop ({stat[0]})"
        time.sleep(0.001)


@contextlib.contextmanager
def frozen(pg: PgInstance) -> Iterator[list[int]]:
    """The server stopped dead while the block runs; yields the pids stopped.

    The postmaster first, and only once it is seen stopped are its children listed: it forks
    no new backend after that, so none escapes. Every stopped process is continued on the way
    out, even after a failure (a stopped postmaster would also hang the instance's cleanup).
    """
    postmaster = pg.postmaster_pid()
    assert postmaster is not None, "the private PostgreSQL is not running"
    stopped: list[int] = []
    try:
        os.kill(postmaster, signal.SIGSTOP)
        stopped.append(postmaster)
        _wait_stopped(postmaster)
        for pid in children(postmaster):
            with contextlib.suppress(ProcessLookupError):  # it exited in between
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        for pid in stopped:
            _wait_stopped(pid)
        yield stopped
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
