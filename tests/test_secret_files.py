"""The development keys kept in DATA_DIR (app.secret_files), through each of their users: the
JWT secret of the dev mode, the signed-URL key and the MCP identity signing key."""

from __future__ import annotations

import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.chat.identity import DEV_KEY_FILE as IDENTITY_KEY_FILE
from app.chat.identity import dev_key_file
from app.files.signing import DEV_KEY_FILE as URL_KEY_FILE
from app.files.signing import url_signing_secret
from app.http.auth import DEV_SECRET_FILE, dev_secret
from app.settings import Settings

KEYS: list[tuple[str, Callable[[Path], object]]] = [
    (DEV_SECRET_FILE, dev_secret),
    (URL_KEY_FILE, lambda d: url_signing_secret(Settings(data_dir=d))),
    (IDENTITY_KEY_FILE, lambda d: dev_key_file(d).read_bytes()),
]


@pytest.mark.parametrize(("name", "read"), KEYS, ids=[name for name, _ in KEYS])
def test_concurrent_first_starts_agree_on_one_private_key(
    tmp_path: Path, name: str, read: Callable[[Path], object]
) -> None:
    data_dir = tmp_path / "data"  # not there yet: the first caller makes it
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: read(data_dir), range(32)))
    assert len(set(keys)) == 1 and keys[0], "every caller reads the one key, never an empty one"
    assert [p.name for p in data_dir.iterdir()] == [name]  # no temporary left
    assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600
    assert read(data_dir) == keys[0]  # kept
