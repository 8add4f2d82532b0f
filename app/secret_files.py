"""Development keys kept in ``DATA_DIR``: made once, mode 0600, the same for every process.

Three keys fall back to a file there when their setting is unset: the JWT secret of the dev
mode (app.http.auth), the signed-URL key (app.files.signing) and the identity signing key for
MCP servers (app.chat.identity). Several workers may start at once on an empty ``DATA_DIR``:
each writes its candidate to a private temporary file and links it into place. A link fails
when the name exists, so the first one wins, every other process reads the winner's key, and
nobody ever reads a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def secret_file(directory: Path, name: str, generate: Callable[[], bytes]) -> Path:
    """``directory / name``, created first (mode 0600, content ``generate()``) if missing."""
    path = directory / name
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{name}.{os.getpid()}.{uuid.uuid4().hex}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(generate())
        # Another process may have won the race: its key is then the key.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
