"""``python -m app users {export,erase}``: one user's data, handed over or removed (GDPR art.
15/20 and 17; docs/userdata.md).

* ``users export --sub <id> --out <file>`` writes the user's ZIP archive (``-`` for standard
  output). The file is written as ``<file>.partial`` and renamed once complete, so a file at
  ``<file>`` is always a whole archive; an existing file is kept unless ``--force``.
* ``users erase --sub <id> [--dry-run] [--json]`` deletes every row of the user, the plugins'
  tables included, and prints what went; ``--dry-run`` prints what would.

``--sub`` is the user id as the app stores it: the token's subject (``JWT_USER_CLAIM``). A user
with no data is not an error: export writes an archive with only empty files and the
manifest, erase says there was nothing, and both exit 0. They connect as ``DATABASE_URL`` (or
the embedded server) like ``prune``: the owner normally; the app's own role works too, since
every statement acts for the one user (``app.user_id``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import asyncpg

from app.chat.plugins import load_plugins
from app.chat.userdata import EraseReport, erase_user, export_archive, is_empty
from app.errors import ConfigurationError, ServiceUnavailableError
from app.ids import MAX_USER_ID_CHARS
from app.pg.engine import aresolve_database_url
from app.pg.pool import open_pool
from app.sanitize import is_storable
from app.settings import Settings, get_settings


class UsageError(Exception):
    """A bad argument: one line, exit status 2."""


def check_sub(sub: str) -> str:
    if not sub.strip():
        raise UsageError("--sub must name a user (the token's subject), not be empty")
    if len(sub) > MAX_USER_ID_CHARS:
        raise UsageError(f"--sub has at most {MAX_USER_ID_CHARS} characters")
    if not is_storable(sub):
        raise UsageError("--sub may not contain NUL characters or unpaired surrogates")
    return sub


@contextlib.asynccontextmanager
async def _pool(settings: Settings) -> Any:
    pool = await open_pool(await aresolve_database_url(settings), settings)
    try:
        yield pool
    finally:
        await pool.close()


async def run_export(settings: Settings, sub: str, out: IO[bytes]) -> dict[str, Any]:
    """Write the archive of ``sub`` to ``out``; the manifest's counts."""
    plugins = load_plugins(settings.chatkit_plugins)
    counts: dict[str, Any] = {}
    async with _pool(settings) as pool:
        # Plain writes: a local file or pipe keeps up, and the command has nothing else to do.
        async for piece in export_archive(pool, plugins, sub, counts=counts):
            out.write(piece)
    out.flush()
    return counts


async def run_erase(settings: Settings, sub: str, *, dry_run: bool) -> EraseReport:
    plugins = load_plugins(settings.chatkit_plugins)
    async with _pool(settings) as pool:
        return await erase_user(pool, plugins, sub, dry_run=dry_run)


def _export(args: argparse.Namespace) -> int:
    sub = check_sub(args.sub)
    settings = get_settings()
    if args.out == "-":
        counts = asyncio.run(run_export(settings, sub, sys.stdout.buffer))
    else:
        target = Path(args.out)
        if target.is_dir():
            raise UsageError(f"--out {args.out} is a directory: name the archive file")
        if target.exists() and not args.force:
            raise UsageError(f"--out {args.out} exists; choose another name or add --force")
        if not target.parent.is_dir():
            raise UsageError(f"--out {args.out}: the folder {target.parent} does not exist")
        partial = target.with_name(target.name + ".partial")
        try:
            with partial.open("wb") as out:
                counts = asyncio.run(run_export(settings, sub, out))
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    where = "standard output" if args.out == "-" else args.out
    if is_empty(counts):
        print(
            f"no data stored for user {sub!r}: wrote an empty archive to {where}", file=sys.stderr
        )
    else:
        print(
            f"exported user {sub!r} to {where}: {counts['threads']} threads, {counts['items']} "
            f"items, {counts['feedback']} feedback, {counts['attachments']} attachments "
            f"({counts['attachment_bytes']} bytes), plugins {json.dumps(counts['plugins'])}",
            file=sys.stderr,
        )
    return 0


def _erase(args: argparse.Namespace) -> int:
    sub = check_sub(args.sub)
    report = asyncio.run(run_erase(get_settings(), sub, dry_run=args.dry_run))
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print("\n".join(report.lines()))
    return 0


def add_parser(sub: Any) -> None:
    users = sub.add_parser("users", help="export or erase one user's data (docs/userdata.md)")
    actions = users.add_subparsers(dest="users_command", required=True)
    export = actions.add_parser("export", help="write the user's data as one ZIP archive")
    export.add_argument("--sub", required=True, help="the user id (the token's subject)")
    export.add_argument("--out", required=True, help="the archive's path, or - for stdout")
    export.add_argument("--force", action="store_true", help="replace an existing file")
    erase = actions.add_parser("erase", help="delete every row of the user, in every table")
    erase.add_argument("--sub", required=True, help="the user id (the token's subject)")
    erase.add_argument("--dry-run", action="store_true", help="only count what would go")
    erase.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_users(args: argparse.Namespace) -> int:
    run = _export if args.users_command == "export" else _erase
    try:
        return run(args)
    except (UsageError, ConfigurationError) as exc:
        print(f"users {args.users_command}: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError, ServiceUnavailableError) as exc:
        cause = exc.__cause__ if isinstance(exc, ServiceUnavailableError) else exc
        line = next(iter(str(cause or exc).splitlines()), "")[:200]
        print(f"users {args.users_command}: failed ({type(exc).__name__}: {line})", file=sys.stderr)
        return 1
