"""The deployment files, checked without running the stack: the compose file against the
Compose Specification schema, every path it names, `nginx -t` on the rendered templates,
`systemd-analyze verify` on the unit, and .env.example against the settings (the Dockerfile:
test_dockerfile.py).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from app.http.drain import SAVE_SECONDS
from app.settings import Settings
from tests.harness.deploy import (
    GZIP_EVERYTHING,
    PROJECT_ROOT,
    Nginx,
    find_nginx,
    require,
    template_variables,
)

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = PROJECT_ROOT / "tests" / "data" / "compose-spec.json"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
UNIT_FILE = PROJECT_ROOT / "deploy" / "chatkit-pg.service"
INITDB_DIR = PROJECT_ROOT / "deploy" / "postgres-init"
APP_ROLE = "chatkit_app"

# Values for the variables compose requires, as an operator's .env would give them.
REQUIRED_ENV = {
    "SERVER_NAME": "chat.example.com",
    "POSTGRES_PASSWORD": "pg-secret",
    "APP_DB_PASSWORD": "app-secret",
    "JWT_SECRET": "jwt-secret",
    "OPENAI_API_KEY": "sk-test",
    "ATTACHMENT_SIGNING_SECRET": "signing-secret",
    "PUBLIC_BASE_URL": "https://chat.example.com",
}
# Settings compose deliberately does not pass to the app: the image and its CMD decide them.
NOT_PASSED_BY_COMPOSE = {
    "DATA_DIR": "the image sets a writable tmpfs path",
    "HOST": "uvicorn --host 0.0.0.0 in the image's CMD",
    "WORKERS": "one process per container; scale with replicas",
    "EMBEDDED_POSTGRES_BIN": "development only: compose runs its own PostgreSQL (DATABASE_URL)",
}


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


# --- Compose variable interpolation (the Compose Specification's rules) -----------------------


class InterpolationError(ValueError):
    pass


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: dict[str, str]) -> str:
    """``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``, ``${VAR:?e}``, ``${VAR?e}``,
    ``${VAR:+r}``, ``${VAR+r}``, with nested expressions in the word."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            value, i = _braced(text, i + 2, env)
            out.append(value)
        else:
            match = _NAME.match(text, i + 1)
            if not match:
                raise InterpolationError(f"invalid interpolation at {text[i:]!r}")
            out.append(env.get(match.group(0), ""))
            i = match.end()
    return "".join(out)


def _braced(text: str, i: int, env: dict[str, str]) -> tuple[str, int]:
    match = _NAME.match(text, i)
    if not match:
        raise InterpolationError(f"invalid variable name in {text!r}")
    name, i = match.group(0), match.end()
    operator = ""
    for op in (":-", ":?", ":+", "-", "?", "+"):
        if text.startswith(op, i):
            operator, i = op, i + len(op)
            break
    depth, start = 1, i
    while depth:
        if i >= len(text):
            raise InterpolationError(f"unterminated ${{ in {text!r}")
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
        i += 1
    word = text[start : i - 1]
    is_set = name in env
    non_empty = bool(env.get(name))
    if operator == "":
        if word:
            raise InterpolationError(f"invalid expression ${{{name}{word}}}")
        return env.get(name, ""), i
    if operator in (":-", "-"):
        use_default = not non_empty if operator == ":-" else not is_set
        return (interpolate(word, env) if use_default else env[name]), i
    if operator in (":?", "?"):
        missing = not non_empty if operator == ":?" else not is_set
        if missing:
            raise InterpolationError(f"required variable {name} is missing a value: {word}")
        return env[name], i
    present = non_empty if operator == ":+" else is_set
    return (interpolate(word, env) if present else ""), i


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate_tree(raw_compose(), dict(REQUIRED_ENV if env is None else env))


def compose_variables() -> dict[str, str | None]:
    """Every variable the compose file interpolates, with its default (None: no default)."""
    found: dict[str, str | None] = {}

    def strings(node: Any) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, dict):
            return [s for value in node.values() for s in strings(value)]
        if isinstance(node, list):
            return [s for item in node for s in strings(item)]
        return []

    for text in strings(raw_compose()):
        text = text.replace("$$", "")
        for match in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-?+])([^}]*))?\}", text):
            name, op, word = match.groups()
            found.setdefault(name, word if op == "-" else None)
    return found


def test_interpolation_rules() -> None:
    """The interpolation the schema test relies on follows compose's rules."""
    env = {"A": "a", "EMPTY": ""}
    assert interpolate("x${A}y$A$$A", env) == "xaya$A"
    assert interpolate("${EMPTY:-d}|${EMPTY-d}|${NONE-d}|${NONE:-${A}}", env) == "d||d|a"
    assert interpolate("${A:+r}|${EMPTY:+r}|${EMPTY+r}", env) == "r||r"
    with pytest.raises(InterpolationError, match="NONE"):
        interpolate("${NONE:?set it}", env)
    with pytest.raises(InterpolationError, match="EMPTY"):
        interpolate("${EMPTY:?set it}", env)
    assert interpolate("${EMPTY?set it}", env) == ""


# --- docker-compose.yml -----------------------------------------------------------------------


def test_compose_schema_copy_is_documented() -> None:
    readme = (COMPOSE_SCHEMA.parent / "README.md").read_text()
    assert "compose-spec.json" in readme and "docker-compose" in readme


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(compose())
    ]
    assert errors == []


def test_schema_validation_can_fail() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    doc = compose()
    doc["services"]["backend"]["depends_on"]["migrate"]["condition"] = "service_finished"
    doc["services"]["nginx"]["portz"] = ["80:80"]
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(doc))) >= 2


@pytest.mark.parametrize("name", sorted(REQUIRED_ENV))
def test_compose_refuses_to_start_without_each_required_variable(name: str) -> None:
    env = {k: v for k, v in REQUIRED_ENV.items() if k != name}
    with pytest.raises(InterpolationError, match=name):
        compose(env)
    with pytest.raises(InterpolationError, match=name):
        compose({**env, name: ""})


def test_no_secret_is_written_in_the_compose_file() -> None:
    # A token is secret; a number of tokens (MAX_OUTPUT_TOKENS) is not.
    secretish = re.compile(r"PASSWORD|SECRET|API_KEY|TOKEN(?!S)|PRIVATE")
    for service_name, service in raw_compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if secretish.search(key):
                assert isinstance(value, str), (service_name, key)
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", value), (service_name, key, value)
    app_url = raw_compose()["x-app-environment"]["DATABASE_URL"]
    owner_url = raw_compose()["x-owner-database-url"]
    for url in (app_url, owner_url):
        assert url.startswith("postgresql://"), "asyncpg-compatible libpq form"
    assert "${APP_DB_PASSWORD:?" in app_url and "POSTGRES_PASSWORD" not in app_url
    assert "${POSTGRES_PASSWORD:?" in owner_url


def test_compose_services_start_in_order() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "migrate", "backend", "nginx", "prune", "mcp-tasks"}
    # `docker compose up` starts all but the jobs behind a profile.
    assert {name for name, s in services.items() if not s.get("profiles")} == {
        "postgres",
        "migrate",
        "backend",
        "nginx",
    }

    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:\d+(-[a-z0-9.]+)?", postgres["image"]), "pin the major version"
    assert any(v.startswith("pgdata:/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pgdata" in compose()["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])

    migrate = services["migrate"]
    # The app's and every plugin's Alembic heads (plain `alembic upgrade head` misses plugins).
    assert migrate["command"] == ["python", "-m", "app", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"

    backend = services["backend"]
    assert backend["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "ports" not in backend, "only nginx is published"
    assert backend["environment"]["DATABASE_URL"].startswith("postgresql://chatkit_app:app-secret@")
    assert migrate["environment"]["DATABASE_URL"].startswith("postgresql://chatkit:pg-secret@")
    assert (
        backend["environment"]["FORWARDED_ALLOW_IPS"]
        == (services["nginx"]["networks"]["edge"]["ipv4_address"])
    )
    assert backend["image"] == migrate["image"]

    nginx = services["nginx"]
    assert nginx["depends_on"]["backend"]["condition"] == "service_healthy"
    assert {p.split(":")[-1] for p in nginx["ports"]} == {"80", "443"}
    # Built from frontend/Dockerfile: a pinned nginx plus the built frontend
    # (tests/deploy/test_frontend_static.py checks that file).
    assert nginx["build"]["context"] == "./frontend"
    assert nginx["image"] == "chatkit-pg-web:local"
    targets = {v.split(":")[1] for v in nginx["volumes"]}
    assert {"/etc/nginx/templates", "/etc/nginx/certs"} <= targets


def _database_url(service: dict[str, Any]) -> tuple[str, str, str, str]:
    """(user, password, host, database) of a service's DATABASE_URL."""
    match = re.fullmatch(
        r"postgresql://([^:@/]+):([^@/]*)@([^:/]+):5432/([^/?]+)",
        service["environment"]["DATABASE_URL"],
    )
    assert match, service["environment"]["DATABASE_URL"]
    user, password, host, database = match.groups()
    return user, password, host, database


@pytest.mark.parametrize(
    "overrides",
    [{}, {"POSTGRES_USER": "postgres", "POSTGRES_DB": "chat"}, {"POSTGRES_USER": "owner"}],
    ids=["defaults", "postgres-superuser", "other-owner"],
)
def test_backend_connects_as_the_app_role_and_only_jobs_as_the_owner(
    overrides: dict[str, str],
) -> None:
    """Row-level security applies to the backend only if it is neither the tables' owner (the
    migrations' role, POSTGRES_USER) nor a superuser (the image's POSTGRES_USER is one)."""
    env = {**REQUIRED_ENV, **overrides}
    services = compose(env)["services"]
    owner = env.get("POSTGRES_USER", "chatkit")
    database = env.get("POSTGRES_DB", "chatkit")
    postgres_env = services["postgres"]["environment"]
    assert postgres_env["POSTGRES_USER"] == owner

    user, password, host, db = _database_url(services["backend"])
    assert user == APP_ROLE == postgres_env["APP_DB_USER"], "the role the init script creates"
    assert user not in {owner, "postgres"}
    assert password == env["APP_DB_PASSWORD"] == postgres_env["APP_DB_PASSWORD"]
    assert password != env["POSTGRES_PASSWORD"]
    assert (host, db) == ("postgres", database)

    for job in ("migrate", "prune"):
        assert _database_url(services[job]) == (
            owner,
            env["POSTGRES_PASSWORD"],
            "postgres",
            database,
        ), job
    assert services["migrate"]["command"] == ["python", "-m", "app", "migrate"]
    assert services["prune"]["command"] == ["python", "-m", "app", "prune"]
    # Any other service that talks to the database (a later worker, say) gets the app's role.
    for name, service in services.items():
        if name not in {"migrate", "prune"} and "DATABASE_URL" in service.get("environment", {}):
            assert _database_url(service)[0] == APP_ROLE, name


def test_postgres_service_creates_the_app_role_on_first_start() -> None:
    """The image runs /docker-entrypoint-initdb.d/*.sh (and *.sql) once, on an empty volume:
    compose mounts deploy/postgres-init there, whose only top-level file is the script, which
    reads its SQL from a subfolder the image ignores (tests/pg/test_app_role.py runs both)."""
    postgres = raw_compose()["services"]["postgres"]
    mounts = [v.split(":") for v in postgres["volumes"]]
    assert ["./deploy/postgres-init", "/docker-entrypoint-initdb.d", "ro"] in mounts
    top_level = sorted(p.name for p in INITDB_DIR.iterdir() if not p.is_dir())
    assert top_level == ["10-app-role.sh"], "the image would run any other *.sh or *.sql here"
    script = INITDB_DIR / "10-app-role.sh"
    assert os.access(script, os.X_OK)
    assert (INITDB_DIR / "sql" / "app-role.sql").is_file()
    assert "sql/app-role.sql" in script.read_text()
    env = postgres["environment"]
    assert env["APP_DB_USER"] == APP_ROLE
    assert env["APP_DB_PASSWORD"].startswith("${APP_DB_PASSWORD:?")
    assert "APP_DB_PASSWORD" in script.read_text() and "APP_DB_USER" in script.read_text()
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_every_path_the_compose_file_references_exists() -> None:
    for name, service in compose()["services"].items():
        build = service.get("build")
        if build:
            context = PROJECT_ROOT / (build if isinstance(build, str) else build["context"])
            assert context.is_dir(), (name, context)
            if isinstance(build, dict) and "dockerfile" in build:
                assert (context / build["dockerfile"]).is_file(), name
        for env_file in service.get("env_file") or []:
            assert (PROJECT_ROOT / env_file).is_file(), (name, env_file)
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (PROJECT_ROOT / source).exists(), (name, source)


def test_nginx_container_gets_every_template_variable_and_nothing_else_is_substituted() -> None:
    nginx = compose()["services"]["nginx"]
    env = nginx["environment"]
    variables = template_variables()
    assert variables, "no templates found"
    assert variables <= set(env), variables - set(env)
    # The image's entrypoint substitutes only names matching NGINX_ENVSUBST_FILTER.
    pattern = re.compile(env["NGINX_ENVSUBST_FILTER"])
    assert all(pattern.search(v) for v in variables)
    for other in ("HOSTNAME", "PATH", "HOME", "NGINX_VERSION_X", "host", "remote_addr"):
        assert not pattern.search(other) or other.startswith("NGINX_"), other


def test_limits_and_timeouts_agree_between_nginx_and_the_app() -> None:
    defaults = compose_variables()
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert int(defaults["MAX_BODY_BYTES"] or 0) == settings.max_body_bytes
    assert int(defaults["MAX_UPLOAD_BYTES"] or 0) == settings.max_upload_bytes
    read_timeout = defaults["NGINX_PROXY_READ_TIMEOUT"] or ""
    assert read_timeout.endswith("s")
    heartbeat = float(defaults["SSE_HEARTBEAT_SECONDS"] or 0)
    assert heartbeat == settings.sse_heartbeat_seconds
    assert float(read_timeout[:-1]) >= 2 * heartbeat, "nginx must outwait two heartbeats"
    backend = compose()["services"]["backend"]
    grace = float(backend["environment"]["GRACEFUL_SHUTDOWN_SECONDS"])
    stop = float(backend["stop_grace_period"].rstrip("s"))
    assert stop > grace + settings.shutdown_grace_seconds
    # uvicorn's wait for connections is the backstop of the app's own grace (app.http.drain):
    # longer, so replies cut by the grace end with their error event, not a dropped connection.
    assert grace > settings.shutdown_grace_seconds + SAVE_SECONDS


def test_compose_passes_every_app_setting() -> None:
    app_env = set(raw_compose()["x-app-environment"])
    backend_env = set(compose()["services"]["backend"]["environment"])
    fields = {name.upper() for name in Settings.model_fields}
    missing = fields - backend_env - set(NOT_PASSED_BY_COMPOSE)
    assert not missing, f"add to x-app-environment in docker-compose.yml: {sorted(missing)}"
    assert app_env <= fields, app_env - fields


# --- .env.example -------------------------------------------------------------------------------


def env_example_entries() -> dict[str, tuple[bool, str]]:
    """NAME -> (active, description comment right above it)."""
    entries: dict[str, tuple[bool, str]] = {}
    lines = ENV_EXAMPLE.read_text().splitlines()
    assignment = re.compile(r"^(#)?([A-Z][A-Z0-9_]*)=(.*)$")
    for number, line in enumerate(lines):
        match = assignment.match(line)
        if not match:
            continue
        above = lines[number - 1] if number else ""
        description = above[1:].strip() if above.startswith("#") else ""
        if assignment.match(above):
            description = ""
        entries[match.group(2)] = (match.group(1) is None, description)
    return entries


def test_env_example_lists_every_setting_with_a_comment() -> None:
    entries = env_example_entries()
    fields = {name.upper() for name in Settings.model_fields}
    assert not fields - set(entries), f"add to .env.example: {sorted(fields - set(entries))}"
    assert not set(compose_variables()) - set(entries), set(compose_variables()) - set(entries)
    undocumented = [name for name, (_, description) in entries.items() if len(description) < 10]
    assert not undocumented, f"each setting needs a comment line above it: {undocumented}"


def test_env_example_leaves_required_secrets_empty() -> None:
    entries = env_example_entries()
    text = ENV_EXAMPLE.read_text()
    for name in REQUIRED_ENV:
        assert entries[name][0], f"{name} is required: leave it uncommented"
        assert re.search(rf"^{name}=$", text, flags=re.M), f"{name} must have no sample value"


def test_env_example_values_are_valid_settings(tmp_path: Path) -> None:
    """Every sample value, uncommented (required ones filled in), is accepted by the app."""
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            name, value = match.groups()
            lines.append(f"{name}={value or REQUIRED_ENV.get(name, '')}")
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(lines) + "\n")
    fields = {name.upper() for name in Settings.model_fields}
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name in fields}
    try:
        settings = Settings(_env_file=env_file)  # type: ignore[call-arg]
    finally:
        os.environ.update(saved)
    assert settings.public_base_url == REQUIRED_ENV["PUBLIC_BASE_URL"]
    assert settings.max_upload_bytes == int(compose_variables()["MAX_UPLOAD_BYTES"] or 0)
    assert settings.production is True


# --- nginx ------------------------------------------------------------------------------------------


def tokenize_nginx(text: str) -> list[str]:
    return re.findall(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'|[{};]|[^\s{};"\']+', re.sub(r"#.*", "", text))


def parse_nginx(text: str) -> list[dict[str, Any]]:
    """Directives as {'name', 'args', 'block'} (block None for simple directives)."""
    tokens = tokenize_nginx(text)
    position = 0

    def parse_block() -> list[dict[str, Any]]:
        nonlocal position
        items: list[dict[str, Any]] = []
        words: list[str] = []
        while position < len(tokens):
            token = tokens[position]
            position += 1
            if token == ";":
                items.append({"name": words[0], "args": words[1:], "block": None})
                words = []
            elif token == "{":
                items.append({"name": words[0], "args": words[1:], "block": parse_block()})
                words = []
            elif token == "}":
                return items
            else:
                words.append(token)
        return items

    return parse_block()


def directives(block: list[dict[str, Any]], name: str) -> list[list[str]]:
    return [d["args"] for d in block if d["name"] == name]


def location(server: list[dict[str, Any]], *args: str) -> list[dict[str, Any]]:
    found = [d["block"] for d in server if d["name"] == "location" and tuple(d["args"]) == args]
    assert found, f"location {' '.join(args)} missing"
    return found[0]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Nginx, list[dict[str, Any]]]:
    nginx = Nginx(prefix=tmp_path_factory.mktemp("nginx-static"), upstream="127.0.0.1:9")
    nginx.binary = nginx.binary or "nginx"  # rendering needs no binary
    nginx.write_config()
    return nginx, parse_nginx((nginx.prefix / "conf.d" / "default.conf").read_text())


def test_templates_render_completely(rendered: tuple[Nginx, list[dict[str, Any]]]) -> None:
    nginx, _ = rendered
    text = (nginx.prefix / "conf.d" / "default.conf").read_text()
    assert "${" not in text
    for own in ("$host", "$request_uri", "$remote_addr", "$proxy_add_x_forwarded_for", "$scheme"):
        assert own in text, f"nginx's {own} must survive envsubst"


def test_http_server_redirects_except_acme(rendered: tuple[Nginx, list[dict[str, Any]]]) -> None:
    nginx, conf = rendered
    servers = [d["block"] for d in conf if d["name"] == "server"]
    plain = next(s for s in servers if not any("ssl" in a for a in directives(s, "listen")))
    acme = location(plain, "^~", "/.well-known/acme-challenge/")
    assert directives(acme, "root") == [[str(nginx.prefix / "acme")]]
    assert directives(location(plain, "/"), "return") == [
        ["301", f"https://$host:{nginx.https_port}$request_uri"]
    ]


def test_https_server_streams_chatkit_unbuffered(
    rendered: tuple[Nginx, list[dict[str, Any]]],
) -> None:
    nginx, conf = rendered
    upstream = next(d for d in conf if d["name"] == "upstream")
    assert directives(upstream["block"], "keepalive"), "upstream keepalive"
    servers = [d["block"] for d in conf if d["name"] == "server"]
    tls = next(s for s in servers if any("ssl" in a for a in directives(s, "listen")))
    assert all({"ssl", "http2"} <= set(a) for a in directives(tls, "listen"))
    assert directives(tls, "ssl_protocols") == [["TLSv1.2", "TLSv1.3"]]
    headers = {a[0]: a for a in directives(tls, "add_header")}
    for name in (
        "Strict-Transport-Security",
        "X-Content-Type-Options",
        "X-Frame-Options",
        "Referrer-Policy",
        "Content-Security-Policy",
    ):
        assert name in headers and headers[name][-1] == "always", name

    chatkit = location(tls, "/chatkit")
    for name, value in {
        "proxy_buffering": ["off"],
        "proxy_cache": ["off"],
        "proxy_http_version": ["1.1"],
        "gzip": ["off"],
        "proxy_read_timeout": [nginx.read_timeout],
        "client_max_body_size": [str(nginx.max_body_bytes)],
    }.items():
        assert directives(chatkit, name) == [value], name
    set_headers = {a[0]: a[1] for a in directives(chatkit, "proxy_set_header")}
    assert set_headers["Connection"] == '""'
    assert set_headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert set_headers["X-Forwarded-Proto"] == "$scheme"
    assert set_headers["Host"] == "$host"
    assert directives(chatkit, "limit_req")

    files = location(tls, "/files")
    assert directives(files, "client_max_body_size") == [[str(nginx.max_upload_bytes)]]
    assert directives(files, "proxy_request_buffering") == [["off"]]
    assert directives(files, "limit_req")

    static = location(tls, "/")
    assert directives(static, "root") == [[str(nginx.static_root)]]
    # An add_header inside a location would drop every server-level security header there.
    for item in tls:
        if item["name"] == "location":
            assert not directives(item["block"], "add_header"), item["args"]


def nginx_or_skip() -> str:
    binary = find_nginx()
    if binary:
        return binary
    if in_ci():
        pytest.fail("nginx is not installed: .ci/run installs Debian's nginx")
    pytest.skip("nginx is not installed (apt-get install nginx); CI installs it")


@pytest.mark.parametrize("http_extra", ["", GZIP_EVERYTHING], ids=["plain", "gzip-on"])
def test_nginx_accepts_the_rendered_configuration(tmp_path: Path, http_extra: str) -> None:
    nginx_or_skip()
    nginx = Nginx(prefix=tmp_path, upstream="127.0.0.1:9", http_extra=http_extra)
    nginx.write_config()
    result = nginx.test_config()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr, result.stderr


def test_nginx_t_rejects_a_broken_template(tmp_path: Path) -> None:
    """`nginx -t` is a real check: the same harness with a directive typo fails it."""
    nginx_or_skip()
    nginx = Nginx(prefix=tmp_path, upstream="127.0.0.1:9")
    nginx.write_config()
    conf = nginx.prefix / "conf.d" / "default.conf"
    conf.write_text(conf.read_text().replace("proxy_buffering off;", "proxy_bufering off;"))
    result = nginx.test_config()
    assert result.returncode != 0 and "proxy_bufering" in result.stderr


# --- systemd ---------------------------------------------------------------------------------------


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT_FILE.read_text())
    return parser


def test_systemd_unit_runs_hardened_as_a_service_user() -> None:
    service = unit()["Service"]
    assert service["User"] not in ("root", "0")
    assert service["EnvironmentFile"].startswith("/etc/")
    assert service["Restart"] == "on-failure"
    assert service["ExecStartPre"].endswith("/.venv/bin/python -m app migrate")
    start = service["ExecStart"]
    for flag in ("--proxy-headers", "--loop uvloop", "--http httptools", "--factory"):
        assert flag in start, flag
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service[key] == value, key
    assert "multi-user.target" in unit()["Install"]["WantedBy"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = require(
        shutil.which("systemd-analyze"), "systemd-analyze", "Debian's systemd; .ci/run installs it"
    )
    # The unit's /opt/chatkit-pg is this checkout, whose .venv has alembic and uvicorn.
    text = UNIT_FILE.read_text().replace("/opt/chatkit-pg", str(PROJECT_ROOT))
    candidate = tmp_path / "chatkit-pg.service"
    candidate.write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(candidate)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    candidate.write_text(text.replace("Restart=on-failure", "Restart=sometimes"))
    broken = subprocess.run(
        [analyze, "verify", "--man=no", str(candidate)], capture_output=True, text=True, timeout=60
    )
    assert "sometimes" in broken.stderr, "verify must notice a bad value"
