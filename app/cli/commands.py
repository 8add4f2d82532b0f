"""The operator's commands. Each resolves the database the same way the app does."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import asyncpg
from alembic import command
from alembic.config import Config
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from app.chat.agent import check_model_settings, load_instructions
from app.chat.identity import load_identity
from app.chat.plugins import load_plugins
from app.cli import distribute, prune
from app.errors import ConfigurationError
from app.http.auth import check_auth_settings, mint_token
from app.observability import configure_logging
from app.pg.engine import resolve_database_url
from app.settings import PROJECT_ROOT, Settings, get_settings

log = logging.getLogger("app.cli.commands")

# What "the database is not there, or will not let us in" looks like while migrating.
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, unreachable, DNS
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InvalidAuthorizationSpecificationError,  # unknown role, bad password
    asyncpg.InvalidCatalogNameError,  # no such database
)


def alembic_config(
    database_url: str, plugin_locations: Sequence[Path] = (), *, quiet: bool = False
) -> Config:
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    if plugin_locations:  # each plugin's revisions are a branch of their own (app.chat.plugins)
        locations = [PROJECT_ROOT / "migrations" / "versions", *plugin_locations]
        cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations))
    cfg.attributes["database_url"] = database_url
    # alembic.ini's logging section prints a line per revision: right for `migrate`, noise
    # before `serve`'s first screen.
    cfg.attributes["skip_logging_config"] = quiet
    return cfg


def migrate(settings: Settings, *, quiet: bool = False) -> str:
    """Bring the database to the Alembic heads (the app's and every plugin's branch); returns
    the URL it used. A bad ``CHATKIT_PLUGINS`` raises ``ConfigurationError`` first.

    A database that cannot be reached or entered is the operator's setting to fix: it is
    reported as one line naming ``DATABASE_URL`` (password hidden), not a driver traceback."""
    locations = load_plugins(settings.chatkit_plugins).migration_locations
    url = resolve_database_url(settings)
    try:
        command.upgrade(alembic_config(url, locations, quiet=quiet), "heads")
    except UNREACHABLE as exc:
        where = make_url(url).render_as_string(hide_password=True)
        raise ConfigurationError(
            f"cannot migrate the database at DATABASE_URL={where} "
            f"({type(exc).__name__}: {first_line(exc)}); check DATABASE_URL and that "
            "PostgreSQL is running"
        ) from exc
    return url


def preflight(settings: Settings) -> None:
    """Every check of the settings alone, before the database or the server starts: the
    lifespan would find the same mistakes, but as a traceback after uvicorn has started."""
    check_auth_settings(settings)
    check_model_settings(settings)
    load_instructions(settings)
    load_identity(settings)  # the MCP identity key (generated once in development)
    load_plugins(settings.chatkit_plugins)


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = get_settings()
    migrate(settings)
    where = "embedded PostgreSQL" if not settings.database_url else "DATABASE_URL"
    print(f"database is at the latest migration ({where})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from app.cli.serve import run_uvicorn, try_it

    settings = get_settings()
    preflight(settings)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    url = migrate(settings, quiet=True)
    # The server process (and anything it spawns) must use the same database.
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    settings = get_settings()
    configure_logging(settings.log_level, force=True)
    print(try_it(settings), flush=True)
    run_uvicorn(settings)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a token this server accepts (only the token, on stdout)."""
    print(mint_token(get_settings(), args.sub, ttl_seconds=args.ttl))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="chatkit-pg")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="alembic upgrade head on the configured or embedded database")
    sub.add_parser("serve", help="migrate, then run the HTTP server")
    token = sub.add_parser("token", help="print a development token (HS modes only)")
    token.add_argument("--sub", required=True, help="the user id the token is for")
    token.add_argument("--ttl", type=int, default=24 * 3600, help="lifetime in seconds")
    prune.add_arguments(
        sub.add_parser(
            "prune",
            help="delete never-attached uploads and, with RETENTION_DAYS, idle threads",
        )
    )
    sub.add_parser(
        "distribute",
        help="after migrate: distribute the chatkit_ tables on a Citus cluster (docs/citus.md)",
    )
    return parser


COMMANDS = {
    "migrate": cmd_migrate,
    "serve": cmd_serve,
    "token": cmd_token,
    "prune": prune.cmd_prune,
    "distribute": distribute.cmd_distribute,
}


FAILED = {"serve": "cannot start", "migrate": "cannot migrate", "token": "cannot issue a token"}


def main(argv: list[str] | None = None) -> int:
    """Run a command. A configuration mistake is one line on stderr naming the setting, and
    exit status 2: no traceback, no log noise before it."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # SIGTERM as an orderly exit: uvicorn re-raises the signal it caught once it has shut down,
    # and Python's default action would end the process there, before the embedded
    # PostgreSQL it started is stopped (app.pg.embedded stops it at exit).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigurationError as exc:
        print(f"chatkit-pg {FAILED.get(args.command, args.command)}: {exc}", file=sys.stderr)
    except ValidationError as exc:
        print(
            f"chatkit-pg {FAILED.get(args.command, args.command)}: {settings_problem(exc)}",
            file=sys.stderr,
        )
    return 2


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """A stop that was asked for: exit 0 (what a supervisor expects of an orderly shutdown),
    unwinding so the embedded PostgreSQL is stopped on the way out."""
    raise SystemExit(0)


def settings_problem(exc: ValidationError) -> str:
    """Pydantic's settings errors as "NAME: what is wrong", by environment variable name and
    without the offending value (it may be a secret)."""
    problems = []
    for error in exc.errors():
        name = "_".join(str(part) for part in error["loc"][:1]).upper() or "settings"
        problems.append(f"{name}: {error['msg']}")
    return "invalid setting " + "; ".join(problems)


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""
