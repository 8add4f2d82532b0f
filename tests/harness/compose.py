"""The compose stack as an operator runs it, for tests/deploy/test_compose_stack.py.

``Deployment`` lays out a deployment folder the way docs/deployment.md tells an operator to: the
repository's docker-compose.yml, deploy/, nginx/ and examples/ copied unchanged, a ``.env``
with test secrets, a self-signed certificate in certs/. Compose then runs the images that
``.ci/images.sh`` built from the project's Dockerfiles (``up --no-build``: the compose client
here, Debian's docker-compose 1.29, builds without BuildKit, which the Dockerfiles need).

``LockstepModel`` is the only fake: an OpenAI-compatible Chat Completions server on this
machine, which the backend containers reach through the stack's edge network. A reply
``lockstep N`` releases delta i+1 only once the test client has acknowledged delta i, so a
reply completes with every delta ``acked`` only if nothing between the model and the client
holds events back; ``hold N`` sends N deltas and then waits until the test releases it (a
stream in flight, for stopping a replica under it). Each streamed request records the peer
address, which names the backend replica that serves it. ``tasks add TITLE`` and ``tasks list``
call the task manager's MCP tool (``add_task``, ``list_tasks``), then reply ``[tool] `` and the
tool's answer as the backend handed it back.

The deployment wires in the ``mcp-tasks`` profile the way examples/mcp_tasks/README.md tells an
operator: an Ed25519 identity key in deploy/, mounted into the backend by a
docker-compose.override.yml, and ``MCP_SERVER_URLS`` + ``IDENTITY_SIGNING_KEY_FILE`` in ``.env``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.harness.deploy import free_port

REPO = Path(__file__).resolve().parents[2]
BACKEND_IMAGE = os.environ.get("CHATKIT_IMAGE", "chatkit-pg:local")
WEB_IMAGE = os.environ.get("CHATKIT_WEB_IMAGE", "chatkit-pg-web:local")
SERVER_NAME = "chat.deploy.test"
# What the deployment folder holds besides .env and certs/ (copied from the repository as is).
LAYOUT = ("docker-compose.yml", "deploy", "nginx", "examples", "frontend/Dockerfile")
COMMAND_SECONDS = 300
MCP_TASKS_URL = "http://mcp-tasks:8001/mcp"  # the profile's TASKS_AUDIENCE


def run(*args: str, check: bool = True, timeout: float = COMMAND_SECONDS, **kw: Any) -> str:
    """A command's stdout; on failure an error carrying its stderr."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return str(done.stdout)


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def compose_client() -> list[str] | None:
    """Debian's docker-compose (1.29), or the Compose plugin of a newer Docker."""
    if found := shutil.which("docker-compose"):
        return [found]
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True)
    return ["docker", "compose"] if plugin.returncode == 0 else None


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 that no Docker network uses yet, for the stack's edge network."""
    used: set[ipaddress.IPv4Network] = set()
    for net in run("docker", "network", "ls", "-q").split():
        for config in (
            json.loads(run("docker", "network", "inspect", net))[0]["IPAM"]["Config"] or []
        ):
            if "Subnet" in config and ":" not in config["Subnet"]:
                used.add(ipaddress.IPv4Network(config["Subnet"]))
    for third in range(64, 250):
        candidate = ipaddress.IPv4Network(f"172.29.{third}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise AssertionError("no free 172.29.x.0/24 subnet for the edge network")


# --- the model ------------------------------------------------------------------------------------


@dataclass
class Streamed:
    prompt: str
    peer: str  # the backend replica's address on the edge network
    sent: int = 0


@dataclass
class LockstepModel:
    """The fake model server (see the module docstring); runs in a thread of its own."""

    wait_seconds: float = 120.0
    streams: list[Streamed] = field(default_factory=list)
    acks: dict[int, threading.Event] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    # "hold N until NAME": held until ``releases[NAME]`` is set instead of ``release``.
    releases: dict[str, threading.Event] = field(default_factory=dict)
    tool_outputs: list[str] = field(default_factory=list)

    def ack(self, index: int) -> None:
        self.acks.setdefault(index, threading.Event()).set()

    def ack_text(self, delta: str) -> None:
        for mark in re.findall(r"\[d(\d+) ", delta):
            self.ack(int(mark))

    async def handle(self, request: Request) -> Response:
        body = await request.json()
        if not body.get("stream"):
            message = {"role": "assistant", "content": "Deploy test"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return JSONResponse(
                {
                    "id": "t",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "fake",
                    "choices": [choice],
                }
            )
        messages = body.get("messages", [])
        prompt = " ".join(str(m.get("content")) for m in messages if m.get("role") == "user")
        if task := re.search(r"tasks (add|list)(?: ([\w ]+))?", prompt):
            return StreamingResponse(
                self._task_turn(task, messages), media_type="text/event-stream"
            )
        record = Streamed(prompt, request.client.host if request.client else "")
        self.streams.append(record)
        return StreamingResponse(self._chunks(record), media_type="text/event-stream")

    async def _task_turn(self, task: re.Match[str], messages: list[Any]) -> AsyncIterator[bytes]:
        """``tasks add TITLE`` / ``tasks list``: call the task manager's tool, then reply with
        what the tool answered (``[tool] ...``), which the test reads from the stream."""
        if messages and messages[-1].get("role") == "tool":
            output = str(messages[-1].get("content"))
            self.tool_outputs.append(output)
            yield _chunk({"role": "assistant", "content": "[tool] " + output})
            yield _chunk({}, "stop")
        else:
            name, args = (
                ("add_task", {"title": task[2]}) if task[1] == "add" else ("list_tasks", {})
            )
            call = {"name": name, "arguments": json.dumps(args)}
            tool_call = {"index": 0, "id": f"call_{name}", "type": "function", "function": call}
            yield _chunk({"role": "assistant", "tool_calls": [tool_call]})
            yield _chunk({}, "tool_calls")
        yield b"data: [DONE]\n\n"

    async def _wait(self, event: threading.Event) -> bool:
        return await asyncio.to_thread(event.wait, self.wait_seconds)

    async def _chunks(self, record: Streamed) -> AsyncIterator[bytes]:
        chunk = _chunk
        yield chunk({"role": "assistant", "content": ""})
        lockstep = re.search(r"lockstep (\d+)", record.prompt)
        held = re.search(r"hold (\d+)", record.prompt)
        found = lockstep or held
        count = int(found[1]) if found else 3
        for i in range(count):
            mark = "first"
            if lockstep and i > 0:
                acked = await self._wait(self.acks.setdefault(i - 1, threading.Event()))
                mark = "acked" if acked else "timeout"
            yield chunk({"content": f"[d{i} {mark}] "})
            record.sent = i + 1
        if held:
            until = re.search(r"hold \d+ until (\w+)", record.prompt)
            named = self.releases.setdefault(until[1], threading.Event()) if until else None
            await self._wait(named or self.release)
        yield chunk({}, "stop")
        yield b"data: [DONE]\n\n"

    @contextmanager
    def serving(self) -> Iterator[int]:
        """Listen on all addresses (the containers come from their bridge): yields the port."""
        app = Starlette(routes=[Route("/v1/chat/completions", self.handle, methods=["POST"])])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
        thread.start()
        try:
            yield int(sock.getsockname()[1])
        finally:
            self.release.set()
            for event in list(self.acks.values()):
                event.set()
            server.should_exit = True
            thread.join(30)
            sock.close()


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    payload = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake",
        "choices": [choice],
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


# --- the deployment -------------------------------------------------------------------------------


@dataclass
class Deployment:
    folder: Path
    project: str
    https_port: int
    subnet: ipaddress.IPv4Network
    compose_cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def lay_out(cls, folder: Path, model_port: int, compose_cmd: list[str]) -> Deployment:
        for name in LAYOUT:
            source, target = REPO / name, folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, target)
        (folder / "certs" / "acme").mkdir(parents=True)
        run(
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={SERVER_NAME}",
            "-addext",
            f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1",
            "-keyout",
            str(folder / "certs/privkey.pem"),
            "-out",
            str(folder / "certs/fullchain.pem"),
        )
        # nginx reads the key as root (its master process); the file stays private on the host.
        subnet = free_subnet()
        https_port = free_port()
        project = f"ckdeploy{os.getpid()}"
        env = {
            "COMPOSE_PROJECT_NAME": project,
            "SERVER_NAME": SERVER_NAME,
            "HTTP_PORT": str(free_port()),
            "HTTPS_PORT": str(https_port),
            "PUBLIC_BASE_URL": f"https://{SERVER_NAME}:{https_port}",
            "EDGE_SUBNET": str(subnet),
            "NGINX_IPV4": str(subnet[10]),
            "POSTGRES_PASSWORD": secrets.token_hex(16),
            "APP_DB_PASSWORD": secrets.token_hex(16),
            "JWT_SECRET": secrets.token_hex(32),
            "ATTACHMENT_SIGNING_SECRET": secrets.token_hex(32),
            "OPENAI_API_KEY": "unused-by-the-fake",
            "OPENAI_BASE_URL": f"http://{subnet[1]}:{model_port}/v1",
            "MODEL_NAME": "fake",
            "THREAD_TITLES": "off",
            # A stopped replica's replies get SHUTDOWN_GRACE_SECONDS (app.http.drain): long
            # enough for the test to resume and finish a resumable one through the survivor,
            # short enough to wait for the others' error events; uvicorn's own wait for
            # connections is only the backstop, longer (as compose's defaults are).
            "SHUTDOWN_GRACE_SECONDS": "20",
            "GRACEFUL_SHUTDOWN_SECONDS": "30",
            # The mcp-tasks profile wired in as examples/mcp_tasks/README.md tells an operator.
            "MCP_SERVER_URLS": MCP_TASKS_URL,
            "IDENTITY_SIGNING_KEY_FILE": "/run/secrets/identity-key.pem",
        }
        (folder / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        key = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (folder / "deploy/identity-key.pem").write_bytes(key)
        # Readable by the image's user (10001) without sudo; a test key in a private tmp folder.
        (folder / "deploy/identity-key.pem").chmod(0o444)
        (folder / "docker-compose.override.yml").write_text(
            "services:\n  backend:\n    volumes:\n"
            "      - ./deploy/identity-key.pem:/run/secrets/identity-key.pem:ro\n"
        )
        return cls(folder, project, https_port, subnet, compose_cmd, env)

    def compose(self, *args: str, check: bool = True, timeout: float = COMMAND_SECONDS) -> str:
        return run(
            *self.compose_cmd,
            "--profile",
            "mcp-tasks",
            *args,
            check=check,
            timeout=timeout,
            cwd=self.folder,
        )

    def compose_result(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.compose_cmd, *args],
            capture_output=True,
            text=True,
            timeout=COMMAND_SECONDS,
            cwd=self.folder,
        )

    def containers(self, service: str | None = None, *, all: bool = False) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        return run("docker", "ps", "-q", *(["-a"] if all else []), *filters).split()

    def inspect(self, container: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(run("docker", "inspect", container))[0]
        return result

    def edge_address(self, container: str) -> str:
        for name, net in self.inspect(container)["NetworkSettings"]["Networks"].items():
            if name.endswith("_edge"):
                return str(net["IPAddress"])
        raise AssertionError(f"{container} is not on the edge network")

    def logs(self, container: str) -> str:
        done = subprocess.run(["docker", "logs", container], capture_output=True, text=True)
        return done.stdout + done.stderr

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": run("docker", "ps", "-aq", "--filter", label).split(),
            "volumes": run("docker", "volume", "ls", "-q", "--filter", label).split(),
            "networks": run("docker", "network", "ls", "-q", "--filter", label).split(),
        }

    def down(self) -> None:
        self.compose("--profile", "jobs", "down", "-v", "--remove-orphans", "--timeout", "60")
