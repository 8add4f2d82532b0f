"""The operator's commands. Each resolves the database the same way the app does."""

from __future__ import annotations

import argparse
import logging
import os

from alembic import command
from alembic.config import Config

from .db import resolve_database_url
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
    settings = get_settings()
    url = migrate(settings)
    # The server process (and anything it spawns) must use the same database.
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    print("database migrated; the HTTP server arrives with the server issue")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="chatkit-pg")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="alembic upgrade head on the configured or embedded database")
    sub.add_parser("serve", help="migrate, then run the HTTP server")
    return parser


COMMANDS = {"migrate": cmd_migrate, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)
