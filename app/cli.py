"""The operator's commands. Each resolves the database the same way the app does."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from alembic import command
from alembic.config import Config

from . import distribute, prune
from .auth import check_auth_settings, mint_token
from .db import resolve_database_url
from .errors import ConfigurationError
from .observability import configure_logging
from .settings import PROJECT_ROOT, Settings, get_settings

log = logging.getLogger("app.cli")


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url
    return cfg


def migrate(settings: Settings) -> str:
    """Bring the database to the Alembic head; returns the URL it used."""
    url = resolve_database_url(settings)
    command.upgrade(alembic_config(url), "head")
    return url


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = get_settings()
    url = migrate(settings)
    where = "embedded PostgreSQL" if not settings.database_url else "DATABASE_URL"
    print(f"database is at the latest migration ({where})")
    log.debug("migrated %s", url)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import run_uvicorn, try_it

    settings = get_settings()
    try:
        check_auth_settings(settings)
    except ConfigurationError as exc:
        print(f"chatkit-pg cannot start: {exc}", file=sys.stderr)
        return 2
    url = migrate(settings)
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)
