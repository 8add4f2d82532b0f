"""A chatkit-pg service in a child process that can be SIGKILLed, clients that remember what the
service acknowledged, and the checks that a restarted service still has all of it.

* ``ServiceProcess`` runs the image's command (uvicorn with uvloop and httptools serving
  ``app.main:create_app``) on a loopback port, with the offline model streaming
  its canned reply word by word. ``kill()`` is SIGKILL: no shutdown hook, no cancellation
  handler, no pool cleanup runs.
* ``Ledger`` holds every write a client saw acknowledged (a 200 JSON answer; in a stream the
  ``thread.created``, ``thread.item.done`` and ``thread.updated`` events received) and the
  operations that were still in flight when the process died (``Pending``).
* ``Writer`` is one client loop: creates threads, sends messages (some with an uploaded file),
  gives feedback, renames and deletes threads, each thread only ever touched by the writer
  that made it, one operation at a time (so every acknowledged state is unambiguous).
* ``verify`` reads the database and the restarted service and checks the ledger against them;
  what an in-flight operation may have left is checked against what that operation could write,
  and then becomes the new baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt

from app.chat.titles import derive_title
from tests.harness.deploy import free_port, stop_process

JWT_SECRET = "crash-tests-" + "k" * 40
REPLY_START = "Hello! This is chatkit-pg's offline demo model"
REPLY_END = "and restart the server."
HIDDEN_TYPES = ("hidden_context_item", "sdk_hidden_context")


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, JWT_SECRET, algorithm="HS256")


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


def user_input(text: str, attachments: list[str] | None = None) -> dict[str, Any]:
    return {
        "content": [{"type": "input_text", "text": text}],
        "attachments": attachments or [],
        "inference_options": {},
    }


def reply_text(item: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for part in item.get("content", []))


def is_complete_reply(item: dict[str, Any]) -> bool:
    text = reply_text(item)
    return text.startswith(REPLY_START) and text.rstrip().endswith(REPLY_END)


def user_message_text(item: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in item.get("content", []) if p["type"] == "input_text")


# --- the service process -------------------------------------------------------------------


@dataclass
class ServiceProcess:
    """The service against ``database_url``; ``workdir`` holds its log and data folder."""

    database_url: str
    workdir: Path
    pycache: Path
    word_delay: float = 0.015
    lease_seconds: float = 3.0
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: list[float] = field(default_factory=list)  # seconds each start took
    ready_at: float = 0.0  # time.monotonic() of the last start's first ready answer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PYTEST_", "COV_", "JWT_", "OPENAI_", "MODEL_", "MCP_"))
        }
        # Bytecode cached outside the checkout: a restart costs the imports, not compiling.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(
            {
                "PYTHONPYCACHEPREFIX": str(self.pycache),
                "PYTHONUNBUFFERED": "1",
                "DATABASE_URL": self.database_url,
                "DATA_DIR": str(self.workdir / "data"),
                "JWT_SECRET": JWT_SECRET,
                "HOST": "127.0.0.1",
                "PORT": str(self.port),
                "WORKERS": "1",
                "LOG_LEVEL": "WARNING",
                "THREAD_TITLES": "first_message",
                "OFFLINE_WORD_DELAY_SECONDS": str(self.word_delay),
                "PUBLIC_BASE_URL": self.url,
                "ATTACHMENT_SIGNING_SECRET": "crash-tests-attachment-secret-" + "a" * 20,
                "SHUTDOWN_GRACE_SECONDS": "2",
                # Per-user limits: no request budget (the checks make many requests); stream
                # leases as short as allowed, so the killed process's leases lapse quickly.
                "RATE_LIMIT_PER_MINUTE": "0",
                "STREAM_LEASE_SECONDS": str(self.lease_seconds),
            }
        )
        return env

    def argv(self) -> list[str]:
        """The image's command (Dockerfile CMD): uvicorn serving the app factory."""
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--proxy-headers",
            "--timeout-graceful-shutdown",
            "5",
            "--no-server-header",
            "--no-access-log",
        ]

    @property
    def log_path(self) -> Path:
        return self.workdir / "service.log"

    def start(self, timeout: float = 90) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        began = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {len(self.starts) + 1} =====\n".encode())
            log.flush()
            # cwd outside the checkout, so a developer's .env cannot leak into the service.
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=self.workdir,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = began + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"service not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        self.ready_at = time.monotonic()
        self.starts.append(self.ready_at - began)

    def kill(self) -> None:
        """SIGKILL, as the kernel's OOM killer or a power cut would stop it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        assert self.proc.returncode == -signal.SIGKILL

    def stop(self) -> int | None:
        """SIGTERM (graceful); returns the exit code (uvicorn re-raises the signal once it has
        shut down, so a clean stop is -SIGTERM; SIGKILL means it did not stop in time)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        stop_process(self.proc, signal.SIGTERM, timeout=20)
        return self.proc.returncode

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-6000:]


# --- what the clients were told ----------------------------------------------------------------


@dataclass
class ThreadRec:
    user: str
    id: str
    owner: int  # the writer that made it; only it touches the thread
    title: str | None = None
    items: dict[str, dict[str, Any]] = field(default_factory=dict)  # acknowledged, in order
    feedback: dict[str, str] = field(default_factory=dict)
    deleted: bool = False  # the deletion was acknowledged
    gone: bool = False  # deleted, acknowledged or found deleted after a crash

    def live(self) -> bool:
        return not self.gone


@dataclass
class FileRec:
    user: str
    id: str
    sha256: str
    size: int
    thread_id: str | None = None  # the thread of an acknowledged message carrying it
    gone: bool = False


@dataclass
class Pending:
    """An operation whose acknowledgement never arrived (the service died first)."""

    op: str  # create | message | feedback | update | delete | upload
    user: str
    writer: int
    thread: ThreadRec | None = None
    text: str | None = None
    title: str | None = None
    item_id: str | None = None
    kind: str | None = None
    attachments: list[str] = field(default_factory=list)
    file_sha256: str | None = None
    file_size: int | None = None
    # stream progress as the client saw it
    user_item_acked: bool = False
    user_item_id: str | None = None
    deltas: int = 0
    reply_acked: bool = False


@dataclass
class Ledger:
    threads: dict[str, ThreadRec] = field(default_factory=dict)
    files: dict[str, FileRec] = field(default_factory=dict)
    left_behind: set[str] = field(default_factory=set)  # cut uploads, for `prune` to remove
    pending: list[Pending] = field(default_factory=list)
    acks: Counter[str] = field(default_factory=Counter)  # acknowledged writes by kind
    # replies cut by the kill after the client had their user message and some deltas:
    # (thread id, user item id) with whether a (complete) reply was found after the restart
    cut_replies: list[tuple[str, str]] = field(default_factory=list)
    cut_reply_saved: list[bool] = field(default_factory=list)

    def of(self, user: str) -> list[ThreadRec]:
        return [t for t in self.threads.values() if t.user == user]


# --- the writers -----------------------------------------------------------------------------


class UnexpectedFailure(AssertionError):
    pass


class RefusedAtKill(Exception):
    """A 429 that reached a writer once the round was being killed: the service refused the
    request (nothing was written) just before it died, so the operation is pending like one cut
    by the kill. While the service is up a 429 is retried instead (the stream limit counts the
    killed process's leases until they expire)."""


@dataclass
class Round:
    """One life of the service: writers run until it is killed."""

    client: httpx.AsyncClient
    ledger: Ledger
    service_ready_at: float  # time.monotonic() when the service answered /readyz
    killed: bool = False
    # 429s (stream limit) met, as seconds after the service became ready
    refused: list[float] = field(default_factory=list)
    # (user, writer) -> the stream it has in flight
    streams: dict[tuple[str, int], Pending] = field(default_factory=dict)

    def mid_reply(self) -> list[Pending]:
        return [p for p in self.streams.values() if p.deltas > 0 and not p.reply_acked]


@dataclass
class Writer:
    round: Round
    user: str
    index: int
    rng: random.Random
    file_bytes: int
    streams: bool = True  # mostly streams, or mostly the fast operations
    pause: float = 0.0  # up to this long between operations
    ops: int = 0

    @property
    def ledger(self) -> Ledger:
        return self.round.ledger

    def my_threads(self) -> list[ThreadRec]:
        return [
            t
            for t in self.ledger.threads.values()
            if t.user == self.user and t.owner == self.index and t.live()
        ]

    def text(self, label: str) -> str:
        vocabulary = ("alpha", "beta", "gamma", "delta", "omega", "pi")
        words = " ".join(self.rng.choice(vocabulary) for _ in range(self.rng.randint(0, 9)))
        tag = f"{self.rng.randrange(16**6):06x}"
        return f"{self.user} w{self.index} {label} {tag}: {words}".strip()

    async def run(self) -> None:
        while not self.round.killed:
            pending = self.next_op()
            try:
                await self.perform(pending)
            except (httpx.HTTPError, RefusedAtKill) as exc:
                if not self.round.killed:
                    raise UnexpectedFailure(
                        f"{pending.op} by {self.user}/w{self.index} failed while the service "
                        f"was up: {type(exc).__name__}: {exc}"
                    ) from exc
                self.ledger.pending.append(pending)
                return
            finally:
                self.round.streams.pop((self.user, self.index), None)
            self.ops += 1
            if self.pause:
                await asyncio.sleep(self.rng.uniform(0, self.pause))

    def next_op(self) -> Pending:
        """Stream writers mostly talk; the others mostly rate, rename and delete (fast
        operations, so many of them run, and one is usually in flight at the kill)."""
        threads = self.my_threads()
        p = Pending(op="create", user=self.user, writer=self.index, text=self.text("new"))
        if not threads:
            return p
        if self.streams:
            choices = [("create", 0.15 if len(threads) < 4 else 0), ("message", 0.55)]
            choices += [("upload", 0.15), ("update", 0.1), ("feedback", 0.05)]
        else:
            choices = [("create", 0.03 if len(threads) < 5 else 0), ("message", 0.02)]
            choices += [("feedback", 0.5), ("update", 0.3), ("delete", 0.15)]
        roll = self.rng.random()
        op = "message"
        for name, weight in choices:
            if roll < weight:
                op = name
                break
            roll -= weight
        answered = [
            t for t in threads if any(i["type"] == "assistant_message" for i in t.items.values())
        ]
        if (op == "feedback" and not answered) or (op == "delete" and len(threads) < 2):
            op = "update"
        p.op = op
        p.thread = self.rng.choice(answered if op == "feedback" else threads)
        if op == "create":
            p.thread = None
        elif op == "message":
            p.text = self.text("msg")
        elif op == "upload":
            # an upload, then a message carrying it (to a thread chosen after the upload)
            p.thread, p.text = None, self.text("file")
        elif op == "feedback":
            replies = [i["id"] for i in p.thread.items.values() if i["type"] == "assistant_message"]
            p.item_id = self.rng.choice(replies)
            p.kind = self.rng.choice(("positive", "negative"))
        elif op == "update":
            p.title = f"{self.user} renamed {self.rng.randrange(16**8):08x}"
        return p

    async def perform(self, p: Pending) -> None:
        if p.op == "create":
            await self.stream(p, "threads.create", {"input": user_input(p.text or "")})
        elif p.op == "message":
            assert p.thread is not None
            params = {"thread_id": p.thread.id, "input": user_input(p.text or "", p.attachments)}
            await self.stream(p, "threads.add_user_message", params)
        elif p.op == "feedback":
            assert p.thread is not None and p.item_id and p.kind
            params = {"thread_id": p.thread.id, "item_ids": [p.item_id], "kind": p.kind}
            assert await self.call("items.feedback", params) == {}
            p.thread.feedback[p.item_id] = p.kind
            self.ledger.acks["feedback"] += 1
        elif p.op == "update":
            assert p.thread is not None and p.title
            answer = await self.call("threads.update", {"thread_id": p.thread.id, "title": p.title})
            if answer.get("title") != p.title or answer.get("id") != p.thread.id:
                raise UnexpectedFailure(f"threads.update answered {answer}")
            p.thread.title = p.title
            self.ledger.acks["title"] += 1
        elif p.op == "delete":
            assert p.thread is not None
            assert await self.call("threads.delete", {"thread_id": p.thread.id}) == {}
            p.thread.deleted = p.thread.gone = True
            for f in self.ledger.files.values():
                if f.thread_id == p.thread.id:
                    f.gone = True
            self.ledger.acks["delete"] += 1
        elif p.op == "upload":
            await self.upload_then_message(p)

    async def call(self, type_: str, params: dict[str, Any]) -> Any:
        response = await self.round.client.post(
            "/chatkit", json={"type": type_, "params": params}, headers=auth(self.user)
        )
        if response.status_code != 200:
            raise UnexpectedFailure(f"{type_}: {response.status_code} {response.text[:300]}")
        return response.json()

    async def upload_then_message(self, p: Pending) -> None:
        threads = self.my_threads()
        line = f"{self.user} file #{self.ops} {self.rng.random()}\n".encode()
        data = (line * (self.file_bytes // len(line) + 1))[: self.file_bytes]
        p.file_sha256, p.file_size = hashlib.sha256(data).hexdigest(), len(data)
        response = await self.round.client.post(
            "/files",
            files={"file": (f"notes-{self.ops}.txt", data, "text/plain")},
            headers=auth(self.user),
        )
        if response.status_code != 200:
            raise UnexpectedFailure(f"upload: {response.status_code} {response.text[:300]}")
        attachment = response.json()
        self.ledger.files[attachment["id"]] = FileRec(
            self.user, attachment["id"], p.file_sha256, p.file_size
        )
        self.ledger.acks["file"] += 1
        if not threads or self.round.killed:
            return
        # The message carrying it is an operation of its own.
        self.ops += 1
        # From here on the upload is acknowledged and the message is what may be in flight.
        p.op, p.thread, p.attachments = "message", self.rng.choice(threads), [attachment["id"]]
        p.file_sha256 = p.file_size = None
        await self.perform(p)

    async def stream(self, p: Pending, type_: str, params: dict[str, Any]) -> None:
        self.round.streams[(self.user, self.index)] = p
        while True:
            async with self.round.client.stream(
                "POST",
                "/chatkit",
                json={"type": type_, "params": params},
                headers={**auth(self.user), "Accept": "text/event-stream"},
            ) as response:
                if response.status_code == 429:
                    if self.round.killed:
                        raise RefusedAtKill(f"{type_}: 429 as the service was killed")
                    # The stream limit, counting the killed process's leases until they expire.
                    self.round.refused.append(time.monotonic() - self.round.service_ready_at)
                    await asyncio.sleep(0.25)
                    continue
                await self.read_stream(p, type_, response)
                return

    async def read_stream(self, p: Pending, type_: str, response: httpx.Response) -> None:
        if response.status_code != 200:
            body = await response.aread()
            raise UnexpectedFailure(f"{type_}: {response.status_code} {body[:300]!r}")
        buffer = ""
        async for chunk in response.aiter_text():
            buffer += chunk
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                data = [ln[6:] for ln in block.split("\n") if ln.startswith("data: ")]
                if data:
                    self.on_event(p, json.loads("\n".join(data)))
        if p.thread is None or not p.reply_acked:
            raise UnexpectedFailure(f"{type_} ended without a reply")

    def on_event(self, p: Pending, event: dict[str, Any]) -> None:
        """Every event a client received is an acknowledgement of what it reports."""
        kind = event["type"]
        ledger = self.ledger
        if kind == "thread.created":
            thread = event["thread"]
            rec = ThreadRec(self.user, thread["id"], self.index, thread.get("title"))
            ledger.threads[rec.id] = rec
            p.thread = rec
            ledger.acks["thread"] += 1
        elif kind == "thread.item.done":
            item = event["item"]
            assert p.thread is not None
            p.thread.items[item["id"]] = item
            ledger.acks["item"] += 1
            if item["type"] == "user_message":
                if user_message_text(item) != p.text:
                    raise UnexpectedFailure(f"user message came back as {item}")
                p.user_item_acked = True
                p.user_item_id = item["id"]
                for attachment in item.get("attachments", []):
                    ledger.files[attachment["id"]].thread_id = p.thread.id
            elif item["type"] == "assistant_message":
                if not is_complete_reply(item):
                    raise UnexpectedFailure(f"incomplete reply acknowledged: {item}")
                p.reply_acked = True
        elif kind == "thread.item.updated":
            p.deltas += 1
        elif kind == "thread.updated":
            assert p.thread is not None
            p.thread.title = event["thread"].get("title")
            ledger.acks["title"] += 1
        elif kind == "error":
            raise UnexpectedFailure(f"error event: {event}")


# --- after a restart: the checks ------------------------------------------------------------------


async def database_invariants(conn: asyncpg.Connection, database: str) -> dict[str, int]:
    """Whole-database checks, independent of the ledger. Returns row counts."""
    orphans = {
        "items without their thread": """
            SELECT count(*) FROM chatkit_items i
            WHERE NOT EXISTS (SELECT 1 FROM chatkit_threads t
                              WHERE t.user_id = i.user_id AND t.id = i.thread_id)""",
        "feedback without its item": """
            SELECT count(*) FROM chatkit_feedback f
            WHERE NOT EXISTS (SELECT 1 FROM chatkit_items i WHERE i.user_id = f.user_id
                              AND i.thread_id = f.thread_id AND i.id = f.item_id)""",
        "attachments naming a missing thread": """
            SELECT count(*) FROM chatkit_attachments a
            WHERE a.thread_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM chatkit_threads t
                              WHERE t.user_id = a.user_id AND t.id = a.thread_id)""",
        "blob chunks without their attachment": """
            SELECT count(*) FROM chatkit_attachment_blobs b
            WHERE NOT EXISTS (SELECT 1 FROM chatkit_attachments a
                              WHERE a.user_id = b.user_id AND a.id = b.attachment_id)""",
        "attached files that are not ready": """
            SELECT count(*) FROM chatkit_attachments
            WHERE thread_id IS NOT NULL AND status <> 'ready'""",
        "ready files with missing or extra bytes": """
            SELECT count(*) FROM chatkit_attachments a
            LEFT JOIN LATERAL (SELECT count(*) AS n, coalesce(sum(length(data)), 0) AS bytes,
                                      coalesce(max(chunk_no), -1) AS last
                               FROM chatkit_attachment_blobs b
                               WHERE b.user_id = a.user_id AND b.attachment_id = a.id) c ON true
            WHERE a.status = 'ready' AND (c.bytes <> a.size_bytes OR c.last <> c.n - 1)""",
        "items whose JSON disagrees with their columns": """
            SELECT count(*) FROM chatkit_items
            WHERE data->>'id' <> id OR data->>'thread_id' <> thread_id OR data->>'type' <> type""",
        "assistant messages cut short": f"""
            SELECT count(*) FROM chatkit_items
            WHERE type = 'assistant_message' AND NOT (
                (SELECT string_agg(p->>'text', '') FROM jsonb_array_elements(data->'content') p)
                LIKE '{REPLY_START.replace("'", "''")}%{REPLY_END}%')""",
    }
    for name, sql in orphans.items():
        assert await conn.fetchval(sql) == 0, name
    # The killed process's sessions are gone: nothing holds a transaction or a lock.
    deadline = time.monotonic() + 10
    while True:
        stuck = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() "
            "AND (state LIKE 'idle in transaction%' OR wait_event_type = 'Lock')",
            database,
        )
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE NOT l.granted AND a.datname = $1",
            database,
        )
        if stuck == 0 and waiting == 0:
            break
        assert time.monotonic() < deadline, f"{stuck} sessions stuck, {waiting} locks waiting"
        await asyncio.sleep(0.1)
    counts = {}
    for table in (
        "chatkit_threads",
        "chatkit_items",
        "chatkit_feedback",
        "chatkit_attachments",
        "chatkit_attachment_blobs",
    ):
        counts[table] = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    return counts


async def api(client: httpx.AsyncClient, user: str, type_: str, params: dict[str, Any]) -> Any:
    response = await client.post(
        "/chatkit", json={"type": type_, "params": params}, headers=auth(user)
    )
    assert response.status_code == 200, (type_, response.status_code, response.text)
    return response.json()


async def list_threads(client: httpx.AsyncClient, user: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100, "order": "asc"}
        if after:
            params["after"] = after
        page = await api(client, user, "threads.list", params)
        found.update({t["id"]: t for t in page["data"]})
        if not page["has_more"]:
            return found
        after = page["after"]


async def list_items(client: httpx.AsyncClient, user: str, thread_id: str) -> list[dict[str, Any]]:
    page = await api(
        client, user, "items.list", {"thread_id": thread_id, "limit": 500, "order": "asc"}
    )
    assert not page["has_more"]
    return list(page["data"])


@dataclass
class Checked:
    threads: int = 0
    items: int = 0
    feedback: int = 0
    titles: int = 0
    deletions: int = 0
    files: int = 0
    pending_resolved: Counter[str] = field(default_factory=Counter)

    def total(self) -> int:
        return self.threads + self.items + self.feedback + self.titles + self.deletions + self.files


async def verify(
    ledger: Ledger, client: httpx.AsyncClient, conn: asyncpg.Connection, users: list[str]
) -> Checked:
    """Check every acknowledged write against the database and the (restarted) service; check
    what each in-flight operation left; then adopt that as the new baseline."""
    checked = Checked()
    by_thread: dict[str, list[Pending]] = {}
    for p in ledger.pending:
        if p.thread is not None:
            by_thread.setdefault(p.thread.id, []).append(p)
    for user in users:
        db_threads = {
            r["id"]: r["title"]
            for r in await conn.fetch(
                "SELECT id, title FROM chatkit_threads WHERE user_id = $1", user
            )
        }
        served = await list_threads(client, user)
        assert set(served) == set(db_threads), "threads.list disagrees with the table"

        # Threads the ledger never heard of: made by a threads.create cut before thread.created.
        blind_creates = [
            p for p in ledger.pending if p.user == user and p.op == "create" and p.thread is None
        ]
        unknown = set(db_threads) - set(ledger.threads)
        assert len(unknown) <= len(blind_creates), (user, unknown, blind_creates)
        for thread_id in sorted(unknown):
            rows = await conn.fetch(
                "SELECT data::text FROM chatkit_items WHERE user_id = $1 AND thread_id = $2 "
                "ORDER BY created_at, seq",
                user,
                thread_id,
            )
            items = [json.loads(r[0]) for r in rows]
            texts = {p.text for p in blind_creates}
            assert [i["type"] for i in items] in (
                [],
                ["user_message"],
                ["user_message", "assistant_message"],
            ), items
            owner = blind_creates[0]
            if items:
                assert user_message_text(items[0]) in texts
                owner = next(p for p in blind_creates if p.text == user_message_text(items[0]))
            blind_creates.remove(owner)
            ledger.threads[thread_id] = ThreadRec(user, thread_id, owner.writer)
            # title, items and feedback are adopted from the served state below
            ledger.threads[thread_id].title = db_threads[thread_id]
            by_thread.setdefault(thread_id, []).append(
                Pending(op="create", user=user, writer=owner.writer, text=owner.text)
            )
            checked.pending_resolved["create (no thread.created)"] += 1

        for rec in ledger.of(user):
            pendings = by_thread.get(rec.id, [])
            if rec.deleted:
                assert rec.id not in db_threads, f"acknowledged deletion undone: {rec.id}"
                checked.deletions += 1
                continue
            if rec.gone:
                assert rec.id not in db_threads
                continue
            if rec.id not in db_threads:
                assert any(p.op == "delete" for p in pendings), f"thread lost: {rec.id}"
                rec.gone = True
                for f in ledger.files.values():
                    if f.thread_id == rec.id:
                        f.gone = True
                checked.pending_resolved["delete (applied)"] += 1
                continue
            checked.threads += 1
            if any(p.op == "delete" for p in pendings):
                checked.pending_resolved["delete (not applied)"] += 1

            # the title
            title = db_threads[rec.id]
            allowed_titles = {rec.title}
            for p in pendings:
                if p.op == "update":
                    allowed_titles.add(p.title)
                if p.op in ("create", "message") and rec.title is None and p.text is not None:
                    allowed_titles.add(derive_title(p.text))
            assert title in allowed_titles, (rec.id, title, allowed_titles)
            assert served[rec.id].get("title") == title
            if rec.title is not None:
                checked.titles += 1
            if any(p.op == "update" for p in pendings):
                applied = "applied" if title != rec.title else "not applied"
                checked.pending_resolved[f"update ({applied})"] += 1
            elif title != rec.title:
                checked.pending_resolved["title from the cut reply"] += 1
            rec.title = title

            # the items: the table, the service, the acknowledgements
            rows = await conn.fetch(
                "SELECT id, type, data::text FROM chatkit_items WHERE user_id = $1 "
                "AND thread_id = $2 ORDER BY created_at, seq",
                user,
                rec.id,
            )
            db_items = [(r[0], r[1], json.loads(r[2])) for r in rows]
            served_items = await list_items(client, user, rec.id)
            assert [i["id"] for i in served_items] == [
                i for i, t, _ in db_items if t not in HIDDEN_TYPES
            ]
            # SIGKILL runs no cancellation handler: no "cancelled" marker is ever written.
            assert not [t for _, t, _ in db_items if t in HIDDEN_TYPES], db_items
            served_by_id = {i["id"]: i for i in served_items}
            for item_id, acked in rec.items.items():
                assert item_id in served_by_id, f"acknowledged item lost: {item_id} in {rec.id}"
                assert served_by_id[item_id] == acked, (served_by_id[item_id], acked)
                checked.items += 1
            order = [i for i in served_by_id if i in rec.items]
            assert order == list(rec.items), "acknowledged items out of order"
            extra = [i for i in served_items if i["id"] not in rec.items]
            streams = [p for p in pendings if p.op in ("create", "message")]
            if extra:
                # Only the tail a cut stream could have written: its user message (if the
                # client never got thread.item.done for it) and the complete reply.
                assert len(streams) == 1, (rec.id, extra, pendings)
                p = streams[0]
                assert [i["id"] for i in served_items[-len(extra) :]] == [i["id"] for i in extra]
                kinds = [i["type"] for i in extra]
                if p.user_item_acked:
                    assert kinds == ["assistant_message"], extra
                else:
                    assert kinds in (["user_message"], ["user_message", "assistant_message"])
                    assert user_message_text(extra[0]) == p.text
                    assert [a["id"] for a in extra[0].get("attachments", [])] == p.attachments
                for item in extra:
                    if item["type"] == "assistant_message":
                        assert is_complete_reply(item), item
                    rec.items[item["id"]] = item
                checked.pending_resolved[f"{p.op} stream (wrote {'+'.join(kinds)})"] += 1
            elif streams:
                checked.pending_resolved[f"{streams[0].op} stream (nothing more)"] += 1
            for p in streams:
                if p.user_item_acked and p.deltas > 0 and not p.reply_acked:
                    assert p.user_item_id is not None
                    ledger.cut_replies.append((rec.id, p.user_item_id))
                    saved = any(i["type"] == "assistant_message" for i in extra)
                    ledger.cut_reply_saved.append(saved)

            # feedback
            db_feedback = {
                r[0]: r[1]
                for r in await conn.fetch(
                    "SELECT item_id, kind FROM chatkit_feedback WHERE user_id = $1 "
                    "AND thread_id = $2",
                    user,
                    rec.id,
                )
            }
            expected = dict(rec.feedback)
            for p in pendings:
                if p.op == "feedback":
                    assert p.item_id is not None
                    options = {expected.get(p.item_id), p.kind}
                    assert db_feedback.get(p.item_id) in options
                    same = db_feedback.get(p.item_id) == expected.get(p.item_id)
                    checked.pending_resolved[f"feedback ({'not ' if same else ''}applied)"] += 1
                    expected[p.item_id] = db_feedback.get(p.item_id)  # type: ignore[assignment]
            expected = {k: v for k, v in expected.items() if v is not None}
            assert db_feedback == expected, (rec.id, db_feedback, expected)
            checked.feedback += len(rec.feedback)
            rec.feedback = db_feedback

        # files
        db_files = {
            r["id"]: r
            for r in await conn.fetch(
                "SELECT a.id, a.thread_id, a.status, a.size_bytes, "
                "(SELECT sha256(string_agg(b.data, ''::bytea ORDER BY b.chunk_no)) "
                " FROM chatkit_attachment_blobs b WHERE b.user_id = a.user_id "
                " AND b.attachment_id = a.id) AS sha FROM chatkit_attachments a "
                "WHERE a.user_id = $1",
                user,
            )
        }
        carried = {a: p for p in ledger.pending for a in p.attachments if p.user == user}
        for f in [f for f in ledger.files.values() if f.user == user]:
            if f.gone:
                assert f.id not in db_files, f"file of a deleted thread survived: {f.id}"
                continue
            row = db_files.get(f.id)
            assert row is not None, f"acknowledged upload lost: {f.id}"
            assert row["status"] == "ready" and row["size_bytes"] == f.size
            assert row["sha"].hex() == f.sha256
            allowed = {f.thread_id}
            if f.id in carried:
                assert carried[f.id].thread is not None
                allowed.add(carried[f.id].thread.id)  # type: ignore[union-attr]
            assert row["thread_id"] in allowed, (f.id, row["thread_id"], allowed)
            f.thread_id = row["thread_id"]
            download = await client.get(f"/files/{f.id}", headers=auth(user))
            assert download.status_code == 200
            assert hashlib.sha256(download.content).hexdigest() == f.sha256
            checked.files += 1
        uploads = [p for p in ledger.pending if p.user == user and p.op == "upload"]
        for file_id in set(db_files) - set(ledger.files) - ledger.left_behind:
            row = db_files[file_id]
            # Only an upload cut by the kill can leave a file nobody was told about, and it is
            # never attached to a thread; a half-written one is never served.
            assert uploads, f"unexplained attachment row {file_id}"
            assert row["thread_id"] is None
            download = await client.get(f"/files/{file_id}", headers=auth(user))
            if row["status"] == "ready":
                assert any(row["sha"].hex() == p.file_sha256 for p in uploads)
                assert download.status_code == 200
                checked.pending_resolved["upload (complete)"] += 1
            else:
                assert download.status_code == 404, download.status_code
                checked.pending_resolved[f"upload (left {row['status']}, not served)"] += 1
            ledger.left_behind.add(file_id)
    ledger.pending.clear()
    return checked
