"""The operator's commands. Each resolves the database the same way the app does."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config

from . import prune
from .auth import check_auth_settings, mint_token
from .db import resolve_database_url
from .errors import ConfigurationError
from .observability import configure_logging
from .plugins import load_plugins
from .settings import PROJECT_ROOT, Settings, get_settings

log = logging.getLogger("app.cli")


def alembic_config(database_url: str, plugin_locations: Sequence[Path] = ()) -> Config:
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    if plugin_locations:  # each plugin's revisions are a branch of their own (app.plugins)
        locations = [PROJECT_ROOT / "migrations" / "versions", *plugin_locations]
        cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations))
    cfg.attributes["database_url"] = database_url
    return cfg


def migrate(settings: Settings) -> str:
    """Bring the database to the Alembic heads (the app's and every plugin's branch); returns
    the URL it used. A bad ``CHATKIT_PLUGINS`` raises ``ConfigurationError`` first."""
    locations = load_plugins(settings.chatkit_plugins).migration_locations
    url = resolve_database_url(settings)
    command.upgrade(alembic_config(url, locations), "heads")
    return url


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = get_settings()
    try:
        url = migrate(settings)
    except ConfigurationError as exc:
        print(f"chatkit-pg cannot migrate: {exc}", file=sys.stderr)
        return 2
    where = "embedded PostgreSQL" if not settings.database_url else "DATABASE_URL"
    print(f"database is at the latest migration ({where})")
    log.debug("migrated %s", url)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import run_uvicorn, try_it

    settings = get_settings()
    try:
        check_auth_settings(settings)
        url = migrate(settings)
    except ConfigurationError as exc:
        print(f"chatkit-pg cannot start: {exc}", file=sys.stderr)
        return 2
    # The server process (and anything it spawns) must use the same database.
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    settings = get_settings()
    # After alembic, whose env.py installs its own logging configuration.
    configure_logging(settings.log_level, force=True)
    print(try_it(settings), flush=True)
    run_uvicorn(settings)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a token this server accepts (only the token, on stdout)."""
    try:
        print(mint_token(get_settings(), args.sub, ttl_seconds=args.ttl))
    except ConfigurationError as exc:
        print(f"cannot issue a token: {exc}", file=sys.stderr)
        return 2
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
    return parser


COMMANDS = {
    "migrate": cmd_migrate,
    "serve": cmd_serve,
    "token": cmd_token,
    "prune": prune.cmd_prune,
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)
