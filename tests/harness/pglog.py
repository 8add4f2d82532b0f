"""Round trips as PostgreSQL itself counts them: a private server logging every statement
(``log_statement = all``). The backend writes a statement's log line before it runs it (to the
server's own log file, without a collector in between), so the log's size read at any moment
is an exact cut: everything before it was sent before that moment.

tests/pg/test_admission.py counts the list requests' statements with it,
tests/http/test_turn_statements.py those of a turn (``threads.add_user_message``).
"""

from __future__ import annotations

import asyncio
import re

import asyncpg

from tests.harness.pg import migrate
from tests.harness.pginstance import PgInstance

LOGGED = re.compile(r"LOG:  (?:execute [^:]*|statement): (.*)")
# With the backend's pid (the default log_line_prefix, '%m [%p] ') and the parameters.
WITH_PARAMETERS = re.compile(
    r"\[(\d+)\] LOG:  (?:execute [^:]*|statement): (.*)"
    r"(?:\n[^\n]*DETAIL:  [Pp]arameters: (.*))?"
)


async def logged_database(pg: PgInstance, database: str) -> str:
    """A freshly migrated ``database`` on ``pg`` whose every statement is logged, from
    connections made after this returns (the app's); its URL."""
    conn = await asyncpg.connect(pg.dsn())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}"')
        await conn.execute(f'CREATE DATABASE "{database}"')
        url = pg.url(database)
        await asyncio.to_thread(migrate, url)
        await conn.execute(f"ALTER DATABASE \"{database}\" SET log_statement = 'all'")
        return url
    finally:
        await conn.close()


def log_offset(pg: PgInstance) -> int:
    """Where the log ends now: statements sent from now on are logged after it."""
    return pg.log_file.stat().st_size


def _since(pg: PgInstance, offset: int) -> str:
    with pg.log_file.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def statements_since(pg: PgInstance, offset: int) -> list[str]:
    """The statements logged since ``offset``."""
    return [m.group(1) for m in LOGGED.finditer(_since(pg, offset))]


def executions_since(pg: PgInstance, offset: int) -> list[tuple[int, str, str]]:
    """The statements logged since ``offset``, each as (the backend's pid, the statement, its
    parameters as logged, "" for none: ``$1 = 'alice', $2 = ...``)."""
    return [
        (int(m.group(1)), m.group(2), m.group(3) or "")
        for m in WITH_PARAMETERS.finditer(_since(pg, offset))
    ]
