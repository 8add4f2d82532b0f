"""Hostile input against the real app: two users, real PostgreSQL, property-based.

Every request goes through ``create_app`` (httpx over ASGI, the real store, the offline
model) as one of two users, *alice* and *bob*. Both own the same kinds of objects (bob's are
seeded first): two threads with messages, widget, structured-input and pending client-tool-call
items, feedback, a file attachment with bytes and an image attachment. One user acts, the other
is the victim. For every answer:

* never a 5xx, and never exception text (tracebacks, class names such as ``ValidationError``,
  library names such as ``asyncpg``, SQL table names) unless the request itself contained it;
* never a secret of the victim (any of its ids, its user id, a marker word only its messages
  hold) in the body or headers unless the request contained it verbatim; and whenever a request
  names a victim id, the same request with each victim id swapped for a never-used id of the
  same shape (the "twin", run from the same database state) gets the same status and the same
  body, once request ids, new ids, timestamps and signed URLs are masked: another user's
  object answers exactly like a missing one;
* 4xx bodies are ``{"error": {"code", "message", "field"?, "request_id"}}`` (the request id
  equal to ``X-Request-ID``); streams are ``text/event-stream`` whose events all validate as
  ChatKit ``ThreadStreamEvent``s (failures being ChatKit ``error`` events);
* afterwards: the victim's rows in every ``chatkit_`` table are exactly as they were, a refused
  request changed none of the actor's rows, every item/attachment/feedback/blob row has its
  parent row of the same user, rows agree with their JSON, and no row of the actor names a
  victim id (in a key column ever; in its data only if the actor sent it).

Each case also states what it expects (e.g. exactly 404 ``not_found`` for a victim id in an id
field, 413 for an oversized body, 400 for a NUL). Where the protocol decides, the SDK's own
request schema is the oracle: a body it rejects must be a 400 ``invalid_request``.

How Hypothesis runs here
------------------------
pytest-asyncio runs ``@given``-decorated ``async def`` tests natively: it wraps Hypothesis'
inner test so that each example is awaited on the session event loop, the loop on which the
async fixtures (the started app, our raw connection) were made. The properties below are
therefore ordinary Hypothesis tests: examples are generated, a failure is shrunk to a minimal
case and reported (with a ``@reproduce_failure`` blob; no example database is written). All
examples share one started app and one seeded world (the module-scoped ``world`` fixture: what
``make_client`` builds per test, built once, since starting, seeding and stopping per property
would cost more than the properties). ``HealthCheck.function_scoped_fixture`` is suppressed for
conftest's autouse garbage collection, which is harmless across examples. Every example puts
the acting user's rows back as they were (``World.restore``), so each one starts from the same database state, as replaying and
shrinking need. Strategies never see real ids (they only exist once the world is seeded): they
build payloads holding ``Ref`` placeholders (an id of the actor, of the victim, or a
well-shaped id nobody has) and byte-level ``Mutation``s, resolved when the example runs.
``HOSTILE_EXAMPLES`` (a factor, default 1) scales the number of examples.

Deterministic ``EXPLICIT`` cases cover every input class as well. ``STATS`` counts, per input
class, the cases sent (property and explicit, twins not counted), their answers by status
class, streams carrying a ChatKit error event, twins compared, and what was lost (checks that
failed, by kind; a shrinking failure counts each replay). The last test prints it as the
Reliability table (docs/reliability.md) and fails if anything was lost.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from chatkit.types import (
    ChatKitReq,
    ClientToolCallItem,
    StructuredInputItem,
    ThreadListParams,
    ThreadStreamEvent,
    WidgetItem,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.main import create_app
from app.pool import ConnectionPool
from app.settings import Settings
from app.store import PostgresStore
from tests import factories as f
from tests.chatkit_client import JWT_TEST_SECRET, ChatKitClient, done_items, parse_sse

# --- the two users and their world ----------------------------------------------------------

ALICE_ID = "alice@hostile.example"
BOB_ID = "bob@hostile.example"
USERS = (ALICE_ID, BOB_ID)
"""User ids with ``@`` and ``.``: no base64url or hex token (signatures, ids) can contain one,
so finding a user id in an answer is a real leak, never a coincidence of random text."""
MARKER = {ALICE_ID: "alice-secret-q7Vd", BOB_ID: "bob-secret-Z3kp"}
"""A word only that user's own messages (and thread titles) contain."""
BODY_LIMIT = 256 * 1024
"""``max_body_bytes`` of the app under test: 10-20k deep nesting fits, oversize stays cheap."""

THREAD_ITEMS = {
    "thread": ("question", "reply"),
    "thread2": ("question2", "reply2", "widget", "structured", "tool_call"),
}
THREADS = tuple(THREAD_ITEMS)
ITEMS = tuple(i for items in THREAD_ITEMS.values() for i in items)
ATTACHMENTS = ("attachment", "image")
NAMES = THREADS + ITEMS + ATTACHMENTS
USER_MESSAGE = {"thread": "question", "thread2": "question2"}

DATA_TABLES = (
    "chatkit_threads",
    "chatkit_items",
    "chatkit_attachments",
    "chatkit_attachment_blobs",
    "chatkit_feedback",
)
"""Parents first. The actor's rows in these are snapshotted and restored around examples."""
KEY_COLUMNS = ("id", "thread_id", "item_id", "attachment_id")


def other(user: str) -> str:
    return BOB_ID if user == ALICE_ID else ALICE_ID


SDK_REQUEST = TypeAdapter[ChatKitReq](ChatKitReq)
STREAM_EVENT = TypeAdapter[ThreadStreamEvent](ThreadStreamEvent)

# --- statistics for the Reliability table -----------------------------------------------------

CLASSES = (
    "well_formed",
    "foreign_ids",
    "unknown_ids",
    "bad_limits",
    "bad_cursors",
    "wrong_types",
    "missing_params",
    "extra_fields",
    "unknown_type",
    "non_object",
    "malformed_json",
    "unstorable_text",
    "invalid_utf8",
    "deep_nesting",
    "huge_body",
)
LOSSES = ("5xx", "leak", "victim_rows_changed", "partial_write", "twin_mismatch", "other")
STATS: dict[str, Counter[str]] = defaultdict(Counter)


# --- payload placeholders and byte mutations --------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """An id resolved when the example runs: ``owner`` is actor, victim or missing; ``name`` a
    world name, or ``@user`` for the user id itself."""

    owner: str
    name: str


@dataclass(frozen=True)
class Tpl:
    """A string made of literal parts and ``Ref``s."""

    parts: tuple[Any, ...]


HOLE = "HOLE8xq"
"""Marks where a mutation splices raw bytes into the serialised payload."""


@dataclass(frozen=True)
class Splice:
    """Replace the hole: the quoted ``"HOLE"`` (a whole JSON value) or the bare one (inside a
    string or a key)."""

    raw: bytes
    value: bool = False

    def apply(self, body: bytes) -> bytes:
        target = f'"{HOLE}"'.encode() if self.value else HOLE.encode()
        assert target in body, (target, body[:200])
        return body.replace(target, self.raw, 1)


@dataclass(frozen=True)
class Truncate:
    at: int

    def apply(self, body: bytes) -> bytes:
        return body[: self.at % len(body)]


@dataclass(frozen=True)
class Affix:
    prefix: bytes = b""
    suffix: bytes = b""

    def apply(self, body: bytes) -> bytes:
        return self.prefix + body + self.suffix


@dataclass(frozen=True)
class Swap:
    old: bytes
    new: bytes

    def apply(self, body: bytes) -> bytes:
        assert self.old in body, (self.old, body[:200])
        return body.replace(self.old, self.new, 1)


@dataclass(frozen=True)
class PadTo:
    """Fill the hole with ``x``s so that the body is exactly ``size`` bytes."""

    size: int

    def apply(self, body: bytes) -> bytes:
        fill = self.size - (len(body) - len(HOLE))
        assert fill >= 0
        return body.replace(HOLE.encode(), b"x" * fill, 1)


@dataclass(frozen=True)
class Raw:
    """The body is these bytes (the payload is ignored)."""

    body: bytes

    def apply(self, body: bytes) -> bytes:
        return self.body


Mutation = Splice | Truncate | Affix | Swap | PadTo | Raw


@dataclass(frozen=True)
class Expect:
    status: frozenset[int] | None = None
    code: str | None = None
    message: str | None = None  # a substring of error.message
    field: str | None = None
    unchanged: bool = False  # the actor's rows are as before
    clean_stream: bool = False  # a stream without ChatKit error events
    stateful: bool = False  # holds only while the actor's rows are as seeded
    oracle: bool = False  # a body the SDK schema rejects must be a plain 400
    max_items: int | None = None  # a page holds at most this many rows


ANY = Expect()


def refused(
    status: int = 400,
    code: str = "invalid_request",
    message: str | None = None,
    field: str | None = None,
) -> Expect:
    return Expect(frozenset({status}), code, message, field, unchanged=True)


NOT_FOUND = refused(404, "not_found", "Not found.")
NOT_JSON = refused(message="not valid JSON")


def expect_status(status: int, code: str | None = None, **kw: Any) -> Expect:
    if status >= 400:
        return Expect(frozenset({status}), code, unchanged=True, stateful=True, **kw)
    return Expect(frozenset({status}), clean_stream=True, stateful=True, **kw)


@dataclass(frozen=True)
class Case:
    cls: str
    actor: str
    payload: Any = None
    mutations: tuple[Mutation, ...] = ()
    expect: Expect = ANY
    transport: str = "length"  # or "chunked": no Content-Length
    headers: tuple[tuple[str, Any], ...] = ()
    ascii_json: bool = False
    note: str = ""

    @property
    def victim(self) -> str:
        return other(self.actor)


# --- JSON tree helpers ---------------------------------------------------------------------

Path = tuple[Any, ...]


def walk(obj: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    yield path, obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from walk(value, (*path, key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield from walk(value, (*path, index))


def get_at(obj: Any, path: Path) -> Any:
    for part in path:
        obj = obj[part]
    return obj


def set_at(obj: Any, path: Path, value: Any) -> Any:
    if not path:
        return value
    out = copy.deepcopy(obj)
    get_at(out, path[:-1])[path[-1]] = value
    return out


def del_at(obj: Any, path: Path) -> Any:
    out = copy.deepcopy(obj)
    del get_at(out, path[:-1])[path[-1]]
    return out


def rename_key(obj: Any, path: Path, key: str, new: Any) -> Any:
    out = copy.deepcopy(obj)
    parent = get_at(out, path)
    parent[new] = parent.pop(key)
    return out


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings_in(k)
            yield from strings_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings_in(v)


def has_unstorable(body: bytes) -> bool:
    """Text PostgreSQL cannot store (NUL, lone surrogates) anywhere in a JSON body."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return any("\x00" in s or any(0xD800 <= ord(c) <= 0xDFFF for c in s) for s in strings_in(data))


def sent_text(body: bytes, headers: dict[str, str]) -> str:
    """Everything a request said: raw bytes and every decoded string (escapes resolved)."""
    parts = [body.decode("utf-8", "replace"), *headers.values()]
    with contextlib.suppress(ValueError, RecursionError):
        parts.extend(strings_in(json.loads(body)))
    return "\n".join(p.encode("utf-8", "replace").decode("utf-8") for p in parts)


# --- the world: two seeded users, snapshots, restore ----------------------------------------


def data_of(snapshot: dict[str, str]) -> dict[str, str]:
    return {t: snapshot[t] for t in DATA_TABLES}


def _snapshot_sql(tables: tuple[str, ...]) -> str:
    columns = ", ".join(
        f"(SELECT coalesce(json_agg(r ORDER BY r::text), '[]'::json) FROM {t} r "
        f"WHERE r.user_id = $1)::text AS {t}"
        for t in tables
    )
    return f"SELECT {columns}"


INTEGRITY_SQL = """
SELECT
  (SELECT count(*) FROM chatkit_items i WHERE i.user_id = $1 AND NOT EXISTS
     (SELECT 1 FROM chatkit_threads t WHERE t.user_id = i.user_id AND t.id = i.thread_id))
     AS items_without_thread,
  (SELECT count(*) FROM chatkit_attachments a WHERE a.user_id = $1 AND a.thread_id IS NOT NULL
     AND NOT EXISTS (SELECT 1 FROM chatkit_threads t
                     WHERE t.user_id = a.user_id AND t.id = a.thread_id))
     AS attachments_without_thread,
  (SELECT count(*) FROM chatkit_feedback x WHERE x.user_id = $1 AND NOT EXISTS
     (SELECT 1 FROM chatkit_items i
      WHERE i.user_id = x.user_id AND i.thread_id = x.thread_id AND i.id = x.item_id))
     AS feedback_without_item,
  (SELECT count(*) FROM chatkit_attachment_blobs b WHERE b.user_id = $1 AND NOT EXISTS
     (SELECT 1 FROM chatkit_attachments a WHERE a.user_id = b.user_id AND a.id = b.attachment_id))
     AS blobs_without_attachment,
  (SELECT count(*) FROM chatkit_items i WHERE i.user_id = $1
     AND (i.data->>'id' IS DISTINCT FROM i.id OR i.data->>'thread_id' IS DISTINCT FROM i.thread_id
          OR i.data->>'type' IS DISTINCT FROM i.type)) AS items_unlike_their_json,
  (SELECT count(*) FROM chatkit_threads t WHERE t.user_id = $1
     AND t.data->>'id' IS DISTINCT FROM t.id) AS threads_unlike_their_json,
  (SELECT count(*) FROM chatkit_attachments a WHERE a.user_id = $1
     AND a.data->>'id' IS DISTINCT FROM a.id) AS attachments_unlike_their_json
"""


@dataclass
class World:
    client: ChatKitClient
    raw: asyncpg.Connection
    ids: dict[str, dict[str, str]]
    missing: dict[str, str]
    user_tables: tuple[str, ...] = ()
    data_baseline: dict[str, dict[str, str]] = field(default_factory=dict)
    """Each user's rows in DATA_TABLES as seeded."""
    current: dict[str, dict[str, str]] = field(default_factory=dict)
    """Each user's rows in every table as last seen (the limiter's rows change with use)."""

    def __repr__(self) -> str:
        return "World(alice, bob)"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis' reports
        printer.text(repr(self))

    # -- ids --

    def id_for(self, ref: Ref, actor: str) -> str:
        if ref.owner == "missing":
            return self.missing[ref.name]
        user = actor if ref.owner == "actor" else other(actor)
        return user if ref.name == "@user" else self.ids[user][ref.name]

    def secrets(self, user: str) -> set[str]:
        # The id also as a URL spells it (signed file URLs carry it in their query).
        return {*self.ids[user].values(), MARKER[user], user, quote(user, safe="")}

    def known_ids(self) -> set[str]:
        return {i for ids in self.ids.values() for i in ids.values()} | set(self.missing.values())

    def resolve(self, obj: Any, actor: str) -> Any:
        if isinstance(obj, Ref):
            return self.id_for(obj, actor)
        if isinstance(obj, Tpl):
            return "".join(self.resolve(p, actor) for p in obj.parts)
        if isinstance(obj, dict):
            return {self.resolve(k, actor): self.resolve(v, actor) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.resolve(v, actor) for v in obj]
        return obj

    def body_of(self, case: Case) -> bytes:
        data = json.dumps(self.resolve(case.payload, case.actor), ensure_ascii=case.ascii_json)
        body = data.encode("utf-8", "surrogatepass")
        for mutation in case.mutations:
            body = mutation.apply(body)
        return body

    def headers_of(self, case: Case) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **self.client.auth(case.actor)}
        for name, value in case.headers:
            headers[name] = self.resolve(value, case.actor)
        return headers

    async def post(self, case: Case, body: bytes, headers: dict[str, str]) -> httpx.Response:
        content: Any = body
        if case.transport == "chunked":

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(body), 16384):
                    yield body[i : i + 16384]

            content = chunks()
        return await self.client.http.post(self.client.path, content=content, headers=headers)

    # -- the database, read and restored as a given user (so RLS lets us) --

    async def _as(self, user: str) -> None:
        await self.raw.execute("SELECT set_config('app.user_id', $1, false)", user)

    async def snapshot(self, user: str) -> dict[str, str]:
        """The user's rows in every ``chatkit_`` table, as JSON text per table."""
        await self._as(user)
        row = await self.raw.fetchrow(_snapshot_sql(self.user_tables), user)
        assert row is not None
        return dict(row)

    async def restore(self, user: str, snap: dict[str, str]) -> None:
        async with self.raw.transaction():
            await self.raw.execute("SELECT set_config('app.user_id', $1, true)", user)
            for table in reversed(DATA_TABLES):
                await self.raw.execute(f"DELETE FROM {table} WHERE user_id = $1", user)
            for table in DATA_TABLES:
                await self.raw.execute(
                    f"INSERT INTO {table} OVERRIDING SYSTEM VALUE "
                    f"SELECT * FROM json_populate_recordset(NULL::{table}, $1::json)",
                    snap[table],
                )
        self.current[user] = await self.snapshot(user)

    async def integrity(self, user: str) -> dict[str, int]:
        await self._as(user)
        row = await self.raw.fetchrow(INTEGRITY_SQL, user)
        assert row is not None
        return {k: v for k, v in dict(row).items() if v}


async def _seed(client: ChatKitClient, store: PostgresStore, raw: Any, user: str) -> dict[str, str]:
    ctx = {"user_id": user}
    ids: dict[str, str] = {}
    for thread, (question, reply, *_) in THREAD_ITEMS.items():
        thread_id, events = await client.create_thread(f"{MARKER[user]} {thread}", user=user)
        (q,) = done_items(events, "user_message")
        (r,) = done_items(events, "assistant_message")
        ids.update({thread: thread_id, question: q["id"], reply: r["id"]})
    thread2 = await store.load_thread(ids["thread2"], ctx)
    later = thread2.created_at + timedelta(seconds=30)
    samples = f.all_item_types(ids["thread2"], base=later)
    widget = next(i for i in samples if isinstance(i, WidgetItem))
    structured = next(i for i in samples if isinstance(i, StructuredInputItem))
    tool_call = next(i for i in samples if isinstance(i, ClientToolCallItem)).model_copy(
        update={"status": "pending", "output": None, "created_at": later + timedelta(minutes=1)}
    )
    for item in (widget, structured, tool_call):
        await store.add_thread_item(ids["thread2"], item, ctx)
    ids.update(widget=widget.id, structured=structured.id, tool_call=tool_call.id)
    attachment = f.file_attachment()
    image = f.image_attachment(thread_id=ids["thread"])
    for a in (attachment, image):
        await store.save_attachment(a, ctx)
    ids.update(attachment=attachment.id, image=image.id)
    await store.save_feedback(ids["thread"], [ids["reply"]], "positive", ctx)
    await raw.execute("SELECT set_config('app.user_id', $1, false)", user)
    await raw.execute(
        "INSERT INTO chatkit_attachment_blobs (user_id, attachment_id, chunk_no, data) "
        "VALUES ($1, $2, 0, $3)",
        user,
        attachment.id,
        f"%PDF-1.4 {MARKER[user]}".encode(),
    )
    assert set(ids) == set(NAMES)
    return ids


def _missing_ids(shape: dict[str, str]) -> dict[str, str]:
    """For each name, an id of the same prefix and length that nobody has."""
    out = {}
    for name, real in shape.items():
        prefix = real.split("_", 1)[0]
        out[name] = f"{prefix}_{hashlib.sha256(f'missing:{name}'.encode()).hexdigest()[:32]}"
        assert len(out[name]) == len(real)
    return out


APP_SETTINGS: dict[str, Any] = {
    # As conftest's ``app_settings`` (a known HS256 secret, no delays, derived titles, the
    # limiter with room for any test), plus the body limit of this module.
    "jwt_secret": SecretStr(JWT_TEST_SECRET),
    "offline_word_delay_seconds": 0.0,
    "thread_titles": "first_message",
    "rate_limit_per_minute": 100_000,
    "max_body_bytes": BODY_LIMIT,
}


@pytest.fixture(scope="module")
async def world(
    test_settings: Settings, engine: AsyncEngine, pool: ConnectionPool
) -> AsyncIterator[World]:
    """One started app and one seeded world for the whole module (``make_client`` does the
    same per test; starting, seeding and stopping per property would cost about 1.5 s each).
    Examples put the actor's rows back, so each test still starts from the seeded state."""
    overrides = {k: v for k, v in APP_SETTINGS.items() if k in Settings.model_fields}
    settings = test_settings.model_copy(update=overrides)
    app = create_app(settings)
    store = PostgresStore(pool)
    async with AsyncExitStack() as stack:
        sa_conn = await stack.enter_async_context(engine.connect())
        raw = (await sa_conn.get_raw_connection()).driver_connection
        assert raw is not None
        rows = await raw.fetch(
            "SELECT DISTINCT table_name::text FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND column_name = 'user_id' "
            "AND table_name LIKE 'chatkit%' ORDER BY 1"
        )
        tables = tuple(r[0] for r in rows)
        assert set(DATA_TABLES) <= set(tables), tables
        truncate = f"TRUNCATE {', '.join(tables)} CASCADE"
        await raw.execute(truncate)
        stack.push_async_callback(raw.execute, truncate)
        stack.push_async_callback(raw.execute, "SELECT set_config('app.user_id', '', false)")
        await stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        http = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30)
        )
        client = ChatKitClient(app, http, settings)
        ids = {user: await _seed(client, store, raw, user) for user in (BOB_ID, ALICE_ID)}
        w = World(client, raw, ids, _missing_ids(ids[ALICE_ID]), tables)
        for user in USERS:
            w.current[user] = await w.snapshot(user)
            w.data_baseline[user] = data_of(w.current[user])
        # conftest collects garbage after every test; the ~300k long-lived objects of the app
        # and libraries would make each collection cost ~0.35 s. Frozen, they are skipped.
        gc.collect()
        gc.freeze()
        stack.callback(gc.unfreeze)
        yield w


# --- checks --------------------------------------------------------------------------------

EXCEPTION_TEXT = [
    re.compile(r"Traceback \(most recent call last\)"),
    re.compile(r'File "[^"]*", line \d+'),
    re.compile(r"\b[A-Z][A-Za-z]*(?:Error|Exception|Violation)\b"),
    re.compile(r"(?i)\b(?:asyncpg|sqlalchemy|psycopg|pydantic|starlette|uvicorn|jiter)\b"),
    re.compile(r"\bsite-packages\b|\b\w+\.py\b"),
    re.compile(r"\bchatkit_(?:threads|items|attachments|attachment_blobs|feedback)\b"),
    re.compile(r"(?i)\b(?:thread|item|attachment|cursor) \S+ (?:was )?not found"),
    re.compile(r"(?i)\b(?:syntax error at|violates|duplicate key|current transaction)\b"),
]
ERROR_KEYS = {"code", "message", "field", "request_id"}
GEN_ID = re.compile(r"\b(?:thr|msg|tc|wf|tsk|atc|shcx)_[0-9a-f]{1,32}")
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?")
URL = re.compile(r"https?://[^\s\"\\]+")
REQUEST_ID = re.compile(r'"request_id":\s*"[^"]*"')


@dataclass
class Answer:
    response: httpx.Response
    json: Any = None
    events: list[dict[str, Any]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (loss kind, text)

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def content_type(self) -> str:
        return self.response.headers.get("content-type", "").split(";")[0]

    def fail(self, kind: str, text: str) -> None:
        self.problems.append((kind, text))


def read_answer(response: httpx.Response) -> Answer:
    """Parse the answer and check its form; problems are collected, not raised."""
    answer = Answer(response)
    if response.status_code >= 500:
        answer.fail("5xx", f"server error {response.status_code}")
    if not response.headers.get("x-request-id"):
        answer.fail("other", "no X-Request-ID header")
    if answer.content_type == "application/json":
        try:
            answer.json = response.json()
        except ValueError:
            answer.fail("other", "a JSON content type with a body that is not JSON")
            return answer
        if response.status_code >= 400:
            error = answer.json.get("error") if isinstance(answer.json, dict) else None
            if not (
                isinstance(error, dict)
                and set(answer.json) == {"error"}
                and {"code", "message"} <= set(error) <= ERROR_KEYS
                and all(isinstance(v, str) for v in error.values())
            ):
                answer.fail("other", "the error body is not {error: {code, message, ...}}")
            elif error.get("request_id") != response.headers.get("x-request-id"):
                answer.fail("other", "error.request_id differs from X-Request-ID")
        elif not isinstance(answer.json, dict):
            answer.fail("other", "a 2xx JSON body that is not an object")
    elif answer.content_type == "text/event-stream":
        if response.status_code != 200:
            answer.fail("other", f"a stream with status {response.status_code}")
        if response.headers.get("cache-control") != "no-cache":
            answer.fail("other", "a stream without Cache-Control: no-cache")
        try:
            answer.events = parse_sse(response.text)
        except ValueError:
            answer.fail("other", "an SSE data line that is not JSON")
            return answer
        for event in answer.events:
            try:
                STREAM_EVENT.validate_python(event)
            except ValidationError:
                answer.fail("other", f"not a ChatKit stream event: {str(event)[:200]}")
    else:
        answer.fail("other", f"unexpected content type {answer.content_type!r}")
    return answer


def haystack(answer: Answer) -> str:
    parts = [answer.response.text, *answer.response.headers.values()]
    parts.extend(strings_in(answer.json))
    for event in answer.events:
        parts.extend(strings_in(event))
    return "\n".join(parts)


def check_text(answer: Answer, world: World, case: Case, sent: str) -> None:
    hay = haystack(answer)
    for pattern in EXCEPTION_TEXT:
        shown = {m.group() for m in pattern.finditer(hay)} - {
            m.group() for m in pattern.finditer(sent)
        }
        if shown:
            answer.fail("other", f"exception or internal text in the answer: {sorted(shown)}")
    for secret in world.secrets(case.victim):
        if secret in hay and secret not in sent:
            answer.fail("leak", f"the answer holds {case.victim}'s {secret!r}")


def check_expectation(answer: Answer, expect: Expect, at_baseline: bool) -> None:
    if expect.stateful and not at_baseline:
        return
    if expect.status is not None and answer.status not in expect.status:
        answer.fail("other", f"status {answer.status}, expected {sorted(expect.status)}")
        return
    error = answer.json.get("error") if isinstance(answer.json, dict) else None
    if error is not None and isinstance(error, dict):
        if expect.code is not None and error.get("code") != expect.code:
            answer.fail("other", f"error code {error.get('code')!r}, expected {expect.code!r}")
        if expect.message is not None and expect.message not in str(error.get("message")):
            answer.fail("other", f"error message {error.get('message')!r} lacks {expect.message!r}")
        if expect.field is not None and error.get("field") != expect.field:
            answer.fail("other", f"error field {error.get('field')!r}, expected {expect.field!r}")
    elif expect.code is not None and answer.status >= 400:
        answer.fail("other", "expected an error body")
    if expect.clean_stream:
        errors = [e for e in answer.events if e.get("type") == "error"]
        if errors:
            answer.fail("other", f"ChatKit error events in the stream: {errors}")
    page = answer.json if isinstance(answer.json, dict) and answer.status == 200 else {}
    if expect.max_items is not None and len(page.get("data", [])) > expect.max_items:
        answer.fail("other", f"a page longer than its limit {expect.max_items}")


def check_scope(answer: Answer, body: bytes) -> None:
    """A page of items holds only items of the thread asked for; a thread is the one asked for."""
    if answer.status != 200 or not isinstance(answer.json, dict):
        return
    try:
        request = json.loads(body)
        kind, thread_id = request["type"], request["params"]["thread_id"]
    except (ValueError, KeyError, TypeError):
        return
    if kind == "items.list":
        strays = [
            i.get("id") for i in answer.json.get("data", []) if i.get("thread_id") != thread_id
        ]
        if strays:
            answer.fail("leak", f"items of another thread in the page: {strays}")
    elif kind in ("threads.get_by_id", "threads.update") and answer.json.get("id") != thread_id:
        answer.fail("leak", f"asked for thread {thread_id}, got {answer.json.get('id')}")


def effective(expect: Expect, body: bytes) -> Expect:
    """Resolve the SDK-schema oracle: what the protocol rejects is a 400 ``invalid_request``."""
    if not expect.oracle:
        return expect
    try:
        SDK_REQUEST.validate_json(body)
    except ValidationError:
        return refused()
    if has_unstorable(body):
        return refused()
    return replace(expect, oracle=False)


def normalised(answer: Answer, back: dict[str, str], keep: set[str]) -> tuple[int, str, str]:
    """An answer with twin ids put back and everything that differs run to run masked."""
    text = answer.response.text
    for twin, original in back.items():
        text = text.replace(twin, original)
    text = REQUEST_ID.sub('"request_id":"*"', text)
    text = URL.sub("<url>", text)
    text = GEN_ID.sub(lambda m: m.group() if m.group() in keep else "<id>", text)
    text = TIMESTAMP.sub("<ts>", text)
    return answer.status, answer.content_type, text


def twin_of(victim_id: str) -> str:
    prefix = victim_id.split("_", 1)[0]
    twin = f"{prefix}_{hashlib.sha256(f'twin:{victim_id}'.encode()).hexdigest()[:32]}"
    return twin[: len(victim_id)]


@dataclass
class ExampleLog:
    sent: list[str] = field(default_factory=list)

    @property
    def corpus(self) -> str:
        return "\n".join(self.sent)


async def _db_problems(
    world: World, case: Case, before: dict[str, str], after: dict[str, str], log: ExampleLog
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    victim = case.victim
    now = await world.snapshot(victim)
    changed = sorted(
        {t for t in world.user_tables if now[t] != world.current[victim][t]}
        | {t for t in DATA_TABLES if now[t] != world.data_baseline[victim][t]}
    )
    if changed:
        problems.append(("victim_rows_changed", f"{victim}'s rows changed in {changed}"))
    victim_ids = set(world.ids[victim].values())
    corpus = log.corpus
    for table in DATA_TABLES:
        for row in json.loads(after[table]):
            named = {row.get(c) for c in KEY_COLUMNS} & victim_ids
            if named:
                problems.append(("leak", f"{case.actor}'s {table} row names {named}"))
        for secret in world.secrets(victim):
            if secret in after[table] and secret not in corpus:
                problems.append(("leak", f"{case.actor}'s {table} rows hold {secret!r}"))
    for user in USERS:
        broken = await world.integrity(user)
        if broken:
            problems.append(("other", f"integrity of {user}'s rows: {broken}"))
    return problems


def _report(case: Case, body: bytes, answer: Answer, twin: Answer | None = None) -> str:
    lines = [
        f"class={case.cls} actor={case.actor} note={case.note!r}",
        f"request ({len(body)} bytes): {body[:600]!r}",
        f"answer {answer.status} {answer.content_type}: {answer.response.text[:1200]}",
    ]
    if twin is not None:
        lines.append(f"twin answer {twin.status}: {twin.response.text[:1200]}")
    lines += [f"  - [{kind}] {text}" for kind, text in answer.problems]
    return "\n".join(lines)


async def run_case(world: World, case: Case, log: ExampleLog) -> None:
    """Send one case, check everything, and (if it names victim ids) its twin."""
    actor = case.actor
    stats = STATS[case.cls]
    body = world.body_of(case)
    headers = world.headers_of(case)
    sent = sent_text(body, headers)
    log.sent.append(sent)
    before = world.current[actor]
    at_baseline = data_of(before) == world.data_baseline[actor]
    answer = read_answer(await world.post(case, body, headers))
    after = world.current[actor] = await world.snapshot(actor)

    expect = effective(case.expect, body)
    check_text(answer, world, case, sent)
    check_expectation(answer, expect, at_baseline)
    check_scope(answer, body)
    changed = [t for t in DATA_TABLES if after[t] != before[t]]
    if (expect.unchanged or answer.status >= 400) and changed:
        answer.fail("partial_write", f"a refused request changed {actor}'s {changed}")
    answer.problems += await _db_problems(world, case, before, after, log)

    twin: Answer | None = None
    victim_ids = sorted(
        (i for i in world.ids[case.victim].values() if i.encode() in body), key=len, reverse=True
    )
    if victim_ids and not answer.problems:
        stats["twins"] += 1
        swap = {v: twin_of(v) for v in victim_ids}
        twin_body = body
        for victim_id, twin_id in swap.items():
            twin_body = twin_body.replace(victim_id.encode(), twin_id.encode())
        if data_of(after) != data_of(before):
            await world.restore(actor, before)
        twin_headers = world.headers_of(case)
        twin_sent = sent_text(twin_body, twin_headers)
        log.sent.append(twin_sent)
        twin = read_answer(await world.post(case, twin_body, twin_headers))
        check_text(twin, world, case, twin_sent)
        twin_after = world.current[actor] = await world.snapshot(actor)
        answer.problems += [(k, f"(twin) {t}") for k, t in twin.problems]
        answer.problems += [
            (k, f"(twin) {t}") for k, t in await _db_problems(world, case, before, twin_after, log)
        ]
        keep = world.known_ids()
        back = {t: v for v, t in swap.items()}
        inconclusive = {429, 409} & {answer.status, twin.status}
        if not inconclusive and normalised(answer, {}, keep) != normalised(twin, back, keep):
            answer.fail(
                "twin_mismatch",
                "a victim's id is answered differently from a missing id of the same shape",
            )
        if data_of(twin_after) != data_of(after):
            await world.restore(actor, after)

    stats["cases"] += 1
    stats[f"{answer.status // 100}xx"] += 1
    if any(e.get("type") == "error" for e in answer.events):
        stats["stream_errors"] += 1
    for kind in {k for k, _ in answer.problems}:
        stats[kind] += 1
    if answer.problems:
        raise AssertionError(_report(case, body, answer, twin))


async def run_example(world: World, cases: list[Case]) -> None:
    """Run cases in order from the seeded state; put the actors' rows back afterwards."""
    log = ExampleLog()
    try:
        for case in cases:
            await run_case(world, case, log)
    finally:
        for user in USERS:
            world.current[user] = await world.snapshot(user)
            if data_of(world.current[user]) != world.data_baseline[user]:
                await world.restore(user, world.data_baseline[user])


# --- strategies ----------------------------------------------------------------------------

actors = st.sampled_from(USERS)
safe_chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
texts = st.text(safe_chars, max_size=16)
any_texts = st.text(max_size=16)  # may hold NUL (no lone surrogates: Hypothesis never makes them)
words = st.text(
    st.characters(min_codepoint=ord("a"), max_codepoint=ord("z")), min_size=1, max_size=8
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
json_objects = st.dictionaries(texts, json_values, max_size=3)

REQUEST_TYPES = (
    "threads.create",
    "threads.add_user_message",
    "threads.get_by_id",
    "threads.list",
    "items.list",
    "threads.update",
    "threads.delete",
    "items.feedback",
    "threads.retry_after_item",
    "threads.add_client_tool_output",
    "threads.add_structured_input",
    "threads.custom_action",
    "threads.sync_custom_action",
    "attachments.delete",
    "attachments.create",
    "input.transcribe",
)
WITH_IDS = tuple(t for t in REQUEST_TYPES if t not in ("attachments.create", "input.transcribe"))


def R(name: str) -> Ref:
    return Ref("actor", name)


@st.composite
def content_parts(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return {"type": "input_text", "text": draw(texts)}
    tag: dict[str, Any] = {
        "type": "input_tag",
        "id": draw(texts),
        "text": draw(texts),
        "data": draw(json_objects),
    }
    if draw(st.booleans()):
        tag["group"] = draw(texts)
    if draw(st.booleans()):
        tag["interactive"] = draw(st.booleans())
    return tag


inference_options = st.fixed_dictionaries(
    {},
    optional={
        "model": st.none() | texts,
        "tool_choice": st.none() | st.fixed_dictionaries({"id": texts}),
    },
)


@st.composite
def message_input(draw: st.DrawFn, min_attachments: int = 0) -> dict[str, Any]:
    attachments = draw(
        st.lists(st.sampled_from(ATTACHMENTS), min_size=min_attachments, max_size=2, unique=True)
    )
    data: dict[str, Any] = {
        "content": draw(st.lists(content_parts(), max_size=3)),
        "attachments": [R(a) for a in attachments],
        "inference_options": draw(inference_options),
    }
    if draw(st.booleans()):
        data["quoted_text"] = draw(st.none() | texts)
    return data


page_params = st.fixed_dictionaries(
    {},
    optional={
        "limit": st.none() | st.integers(0, 50),
        "order": st.sampled_from(["asc", "desc"]),
    },
)


@st.composite
def own_request(
    draw: st.DrawFn, kinds: tuple[str, ...] = REQUEST_TYPES, require_slot: bool = False
) -> tuple[dict[str, Any], int, str | None]:
    """A well-formed request on the actor's own objects and the status it must get from the
    seeded state; ``require_slot`` makes sure it names at least one id."""
    kind = draw(st.sampled_from(kinds))
    thread = draw(st.sampled_from(THREADS))
    params: dict[str, Any]
    status, code = 200, None
    if kind == "threads.create":
        params = {"input": draw(message_input(1 if require_slot else 0))}
    elif kind == "threads.add_user_message":
        params = {"thread_id": R(thread), "input": draw(message_input())}
    elif kind in ("threads.get_by_id", "threads.delete"):
        params = {"thread_id": R(thread)}
    elif kind == "threads.update":
        params = {"thread_id": R(thread), "title": draw(texts)}
    elif kind == "threads.list":
        params = draw(page_params)
        if require_slot or draw(st.booleans()):
            params["after"] = R(draw(st.sampled_from(THREADS)))
    elif kind == "items.list":
        params = {"thread_id": R(thread), **draw(page_params)}
        if draw(st.booleans()):
            params["after"] = R(draw(st.sampled_from(THREAD_ITEMS[thread])))
    elif kind == "items.feedback":
        items = draw(st.lists(st.sampled_from(THREAD_ITEMS[thread]), max_size=3, unique=True))
        params = {
            "thread_id": R(thread),
            "item_ids": [R(i) for i in items],
            "kind": draw(st.sampled_from(["positive", "negative"])),
        }
    elif kind == "threads.retry_after_item":
        params = {"thread_id": R(thread), "item_id": R(USER_MESSAGE[thread])}
    elif kind == "threads.add_client_tool_output":
        params = {"thread_id": R("thread2"), "result": draw(json_values)}
    elif kind == "threads.add_structured_input":
        answers = draw(
            st.dictionaries(
                st.sampled_from(["q1", "q2"]) | words,
                st.fixed_dictionaries(
                    {},
                    optional={"values": st.lists(texts, max_size=2), "skipped": st.booleans()},
                ),
                max_size=3,
            )
        )
        submission: dict[str, Any] = {"answers": answers}
        if draw(st.booleans()):
            submission["status"] = draw(st.sampled_from(["answered", "skipped"]))
        params = {"thread_id": R("thread2"), "item_id": R("structured"), "input": submission}
    elif kind in ("threads.custom_action", "threads.sync_custom_action"):
        params = {
            "thread_id": R("thread2"),
            "action": {"type": draw(words), "payload": draw(json_values)},
        }
        if draw(st.booleans()):
            params["item_id"] = R("widget")
        status, code = 400, "unsupported"
    elif kind == "attachments.delete":
        params = {"attachment_id": R(draw(st.sampled_from(ATTACHMENTS)))}
    elif kind == "attachments.create":
        params = {
            "name": draw(texts),
            "size": draw(st.integers(0, 100_000)),
            "mime_type": draw(st.sampled_from(["application/pdf", "text/plain", "image/png"])),
        }
    else:
        assert kind == "input.transcribe"
        params = {"audio_base64": "AAAA", "mime_type": "audio/webm"}
        status, code = 400, "unsupported"
    payload: dict[str, Any] = {"type": kind, "params": params}
    if draw(st.booleans()):
        payload["metadata"] = draw(json_objects)
    return payload, status, code


def ref_paths(payload: Any) -> list[Path]:
    """Where the payload names one of the actor's objects."""
    return [p for p, v in walk(payload) if isinstance(v, Ref) and v.owner == "actor"]


def fitting(payload: dict[str, Any], path: Path) -> set[str]:
    """The names that fit an id slot (an own object of the right kind, in the right thread)."""
    key = path[-1] if isinstance(path[-1], str) else path[-2]
    if key == "thread_id":
        return set(THREADS)
    if key in ("attachment_id", "attachments"):
        return set(ATTACHMENTS)
    if payload["type"] == "threads.list":
        return set(THREADS)
    return set(THREAD_ITEMS[payload["params"]["thread_id"].name])


def victim_user_headers() -> st.SearchStrategy[tuple[tuple[str, Any], ...]]:
    names = st.sampled_from(["X-User-Id", "X-Forwarded-User", "X-Remote-User", "X-Auth-Subject"])
    return st.lists(st.tuples(names, st.just(Ref("victim", "@user"))), max_size=2, unique=True).map(
        tuple
    )


LITERAL_FIELDS = ("type", "kind", "order", "mime_type", "status")
"""Request fields whose strings are one of a few literals (not free text)."""
IDENTITY_KEYS = ("user_id", "userId", "sub", "owner", "as_user")


@st.composite
def well_formed_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    payload, status, code = draw(own_request())
    return Case(
        "well_formed",
        actor or draw(actors),
        payload,
        expect=expect_status(status, code),
        ascii_json=draw(st.booleans()),
    )


@st.composite
def foreign_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    """The victim's ids in id fields (404, like a missing id) or as mere data (the twin check),
    with identity claims for the victim in extra fields and headers."""
    payload, status, code = draw(own_request(WITH_IDS, require_slot=True))
    headers = draw(victim_user_headers())
    claims = draw(
        st.lists(
            st.tuples(st.sampled_from([(), ("params",)]), st.sampled_from(IDENTITY_KEYS)),
            max_size=2,
        )
    )
    mode = draw(st.sampled_from(["slots", "slots", "data", "shadow"]))
    if mode == "data":
        # As text: the victim's id mentioned in a message, title, metadata...
        spots = [
            p for p, v in walk(payload) if isinstance(v, str) and p and p[-1] not in LITERAL_FIELDS
        ]
        if spots:
            spot = draw(st.sampled_from(spots))
            mention = Tpl(("about ", Ref("victim", draw(st.sampled_from(NAMES)))))
            payload = set_at(payload, spot, mention)
            return Case(
                "foreign_ids",
                actor or draw(actors),
                payload,
                expect=expect_status(status, code),
                headers=headers,
                note="victim id as data",
            )
    chosen = draw(st.sets(st.sampled_from(ref_paths(payload)), min_size=1))
    victimised = payload
    for path in sorted(chosen, key=len):
        name = draw(st.sampled_from(sorted(fitting(payload, path))) | st.sampled_from(NAMES))
        victimised = set_at(victimised, path, Ref("victim", name))
    for where, key in claims:  # identity claims for the victim, as extra fields
        victimised = set_at(victimised, (*where, key), Ref("victim", "@user"))
    if mode == "shadow":
        # Two "params" keys (raw JSON): the actor's own and the victim's, in either order.
        own, theirs = payload["params"], victimised["params"]
        first, last = (own, theirs) if draw(st.booleans()) else (theirs, own)
        shadowed = {"params": first, "type": payload["type"], "PARAMS2": last}
        return Case(
            "foreign_ids",
            actor or draw(actors),
            shadowed,
            mutations=(Swap(b'"PARAMS2"', b'"params"'),),
            expect=ANY,
            headers=headers,
            note="duplicate params key",
        )
    return Case("foreign_ids", actor or draw(actors), victimised, expect=NOT_FOUND, headers=headers)


@st.composite
def unknown_ids_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    """Ids nobody has (same shape) or the actor's own ids in the wrong place: 404."""
    payload, _, _ = draw(own_request(WITH_IDS, require_slot=True))
    chosen = draw(st.sets(st.sampled_from(ref_paths(payload)), min_size=1))
    out = payload
    for path in sorted(chosen, key=len):
        wrong = sorted(set(NAMES) - fitting(payload, path))
        if draw(st.booleans()):
            out = set_at(out, path, Ref("missing", draw(st.sampled_from(NAMES))))
        else:
            out = set_at(out, path, Ref("actor", draw(st.sampled_from(wrong))))
    return Case("unknown_ids", actor or draw(actors), out, expect=NOT_FOUND)


hostile_limits = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 499, 500, 501, 2**31, 2**63, -(2**63), 10**30]),
    st.floats(),
    st.sampled_from(["10", " 3 ", "-5", "3.0", "1e3", "ten", "", "0x10"]),
    st.booleans(),
    st.none(),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(words, st.integers(), max_size=1),
)


def limit_outcome(limit: Any) -> tuple[int, int | None]:
    """Status and page bound for a ``limit``, by the SDK's schema: 400 when it rejects the
    value or it is negative; else 200 with at most min(limit or 20, 500) rows."""
    try:
        parsed = ThreadListParams.model_validate_json(json.dumps({"limit": limit}))
    except (ValidationError, ValueError):
        return 400, None
    if parsed.limit is None or parsed.limit == 0:
        return 200, 20
    if parsed.limit < 0:
        return 400, None
    return 200, min(parsed.limit, 500)


@st.composite
def bad_limit_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    limit = draw(hostile_limits)
    status, bound = limit_outcome(limit)
    if draw(st.booleans()):
        payload = {"type": "threads.list", "params": {"limit": limit}}
    else:
        thread = draw(st.sampled_from(THREADS))
        payload = {"type": "items.list", "params": {"thread_id": R(thread), "limit": limit}}
    if draw(st.booleans()):
        order = draw(st.sampled_from(["asc", "desc"]) | texts)
        payload["params"]["order"] = order
        if order not in ("asc", "desc"):
            status, bound = 400, None
    expect = expect_status(200, max_items=bound) if status == 200 else refused()
    return Case("bad_limits", actor or draw(actors), payload, expect=expect, note=repr(limit))


@st.composite
def bad_cursor_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    listing = draw(st.sampled_from(["threads.list", "items.list"]))
    thread = draw(st.sampled_from(THREADS))
    params: dict[str, Any] = {} if listing == "threads.list" else {"thread_id": R(thread)}
    fits = set(THREADS) if listing == "threads.list" else set(THREAD_ITEMS[thread])
    kind = draw(
        st.sampled_from(["own", "victim", "missing", "text", "long", "nul", "type", "null"])
    )
    expect = NOT_FOUND
    if kind in ("own", "victim", "missing"):
        name = draw(st.sampled_from(NAMES))
        after: Any = Ref({"own": "actor"}.get(kind, kind), name)
        if kind == "own" and name in fits:
            expect = expect_status(200)
    elif kind == "text":
        after = draw(
            texts | st.sampled_from(["", " ", "%", "*", "' OR '1'='1", "thr_", "..", "\\"])
        )
    elif kind == "long":
        after = draw(st.text(safe_chars, min_size=300, max_size=3000))
    elif kind == "nul":
        text = draw(texts)
        at = draw(st.integers(0, len(text)))
        after = text[:at] + "\x00" + text[at:]
        expect = refused()
    elif kind == "type":
        after = draw(json_values.filter(lambda v: v is not None and not isinstance(v, str)))
        expect = refused()
    else:
        after = None
        expect = expect_status(200)
    params["after"] = after
    if draw(st.booleans()):
        params["order"] = draw(st.sampled_from(["asc", "desc"]))
    return Case(
        "bad_cursors", actor or draw(actors), {"type": listing, "params": params}, expect=expect
    )


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, Ref | Tpl):
        return "str"
    return type(value).__name__


@st.composite
def wrong_type_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    payload, _, _ = draw(own_request())
    paths = [p for p, _ in walk(payload) if p]
    changed = payload
    for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=2, unique=True)):
        try:
            current = get_at(changed, path)
        except (KeyError, IndexError, TypeError):
            continue
        value = draw(json_values.filter(lambda v, c=current: json_type(v) != json_type(c)))
        changed = set_at(changed, path, value)
    return Case("wrong_types", actor or draw(actors), changed, expect=Expect(oracle=True))


@st.composite
def missing_params_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    payload, status, code = draw(own_request())
    how = draw(st.sampled_from(["no params", "null params", "empty params", "key", "key"]))
    if how == "no params":
        return Case(
            "missing_params", actor or draw(actors), del_at(payload, ("params",)), expect=refused()
        )
    if how == "null params":
        payload = set_at(payload, ("params",), None)
        return Case("missing_params", actor or draw(actors), payload, expect=refused())
    if how == "empty params":
        payload = set_at(payload, ("params",), {})
        base = expect_status(status, code) if payload["type"] == "threads.list" else refused()
        return Case("missing_params", actor or draw(actors), payload, expect=base)
    keys = [(p, k) for p, v in walk(payload["params"]) if isinstance(v, dict) for k in v]
    if not keys:
        return Case(
            "missing_params", actor or draw(actors), del_at(payload, ("params",)), expect=refused()
        )
    path, key = draw(st.sampled_from(keys))
    payload = del_at(payload, ("params", *path, key))
    base = expect_status(status, code)
    return Case(
        "missing_params",
        actor or draw(actors),
        payload,
        expect=replace(base, oracle=True),
        note=f"without params.{'.'.join(map(str, (*path, key)))}",
    )


@st.composite
def extra_fields_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    """Unknown keys anywhere (identity claims for the victim among them) are ignored or
    refused; they never change whose data a request reaches."""
    payload, status, code = draw(own_request())
    dicts = [p for p, v in walk(payload) if isinstance(v, dict)]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(dicts))
        key = draw(
            st.sampled_from([*IDENTITY_KEYS, "__proto__", "constructor", "$where"])
            | words.map(lambda w: f"x_{w}")
        )
        value = draw(st.just(Ref("victim", "@user")) | json_values)
        target = get_at(payload, path)
        if key in target:
            continue
        payload = set_at(payload, (*path, key), value)
        dicts = [p for p, v in walk(payload) if isinstance(v, dict)]
    headers = draw(victim_user_headers())
    return Case(
        "extra_fields",
        actor or draw(actors),
        payload,
        expect=replace(expect_status(status, code), oracle=True),
        headers=headers,
    )


VALID_TYPES = set(REQUEST_TYPES)


@st.composite
def unknown_type_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    payload, _, _ = draw(own_request())
    real = payload["type"]
    how = draw(st.sampled_from(["text", "near", "json", "missing"]))
    if how == "missing":
        return Case(
            "unknown_type",
            actor or draw(actors),
            del_at(payload, ("type",)),
            expect=refused(field="type"),
        )
    if how == "text":
        value: Any = draw(any_texts.filter(lambda t: t not in VALID_TYPES))
    elif how == "near":
        value = draw(
            st.sampled_from(
                [
                    real.upper(),
                    real.title(),
                    f" {real}",
                    f"{real} ",
                    real.replace(".", "_"),
                    real.replace(".", "/"),
                    real + "s",
                    real.split(".")[0],
                    real + "\u200b",
                    "threads.*",
                    "admin.threads.list",
                ]
            )
        )
    else:
        value = draw(json_values.filter(lambda v: not isinstance(v, str)))
    payload = set_at(payload, ("type",), value)
    return Case("unknown_type", actor or draw(actors), payload, expect=refused(field="type"))


@st.composite
def non_object_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    payload, _, _ = draw(own_request())
    value = draw(
        st.one_of(
            json_values.filter(lambda v: not isinstance(v, dict)),
            st.just([payload]),
            st.just([payload, payload]),
            st.just(json.dumps({"type": "threads.list", "params": {}})),
        )
    )
    return Case(
        "non_object", actor or draw(actors), value, expect=refused(message="must be a JSON object")
    )


BROKEN_JSON = [
    Affix(suffix=b"x"),
    Affix(suffix=b","),
    Affix(suffix=b"}"),
    Affix(suffix=b"{}"),
    Affix(prefix=b"\xef\xbb\xbf"),
    Affix(prefix=b"/* hi */"),
    Affix(prefix=b"// hi\n"),
    Affix(prefix=b"callback("),
    Affix(prefix=b")]}'\n"),
    Swap(b'"type"', b"'type'"),
    Swap(b'"type"', b"type"),
    Swap(b'{"type"', b'{"type":"x",,"type"'),
    Swap(b":", b"="),
    Swap(b'"params": {', b'"params": {,'),
    Swap(b'"type": "', b'"type": "\n'),
    Swap(b'"type": "', b'"type": "\x01'),
    Swap(b'"type": "', b'"type": "\\x'),
    Swap(b'"type": "', b'"type": "\\u12'),
]


@st.composite
def malformed_json_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    payload, _, _ = draw(own_request())
    if draw(st.booleans()):
        mutation: Mutation = Truncate(draw(st.integers(0, 10_000)))
    else:
        mutation = draw(st.sampled_from(BROKEN_JSON))
    return Case("malformed_json", actor or draw(actors), payload, (mutation,), expect=NOT_JSON)


def hole_sites(payload: Any) -> list[tuple[str, Path, Any]]:
    """Places a hole can go: a string value, an id slot, or a key."""
    sites: list[tuple[str, Path, Any]] = []
    for path, value in walk(payload):
        if isinstance(value, str | Ref) and path:
            sites.append(("value", path, None))
        if isinstance(value, dict):
            sites.extend(("key", path, key) for key in value)
    return sites


@st.composite
def with_hole(draw: st.DrawFn, payload: Any) -> Any:
    kind, path, key = draw(st.sampled_from(hole_sites(payload)))
    if kind == "key":
        return rename_key(payload, path, key, f"{key}{HOLE}")
    value = get_at(payload, path)
    if isinstance(value, Ref):
        return set_at(payload, path, Tpl((value, HOLE)))
    at = draw(st.integers(0, len(value)))
    return set_at(payload, path, value[:at] + HOLE + value[at:])


UNSTORABLE = [
    b"\\u0000",
    b"\\u0000\\u0000",
    b"\x00",
    b"\\ud800",
    b"\\udbff",
    b"\\udc00",
    b"\\udfff",
    b"\\ud83d",
    b"\\ude00\\ud83d",
    b"\\ud800\\u0041",
    b"\\uD800",
    b"\\uDFFFx",
]


@st.composite
def unstorable_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    payload, _, _ = draw(own_request())
    payload = draw(with_hole(payload))
    inject = draw(st.sampled_from(UNSTORABLE))
    return Case(
        "unstorable_text",
        actor or draw(actors),
        payload,
        (Splice(inject),),
        expect=refused(),
        note=repr(inject),
    )


INVALID_UTF8 = [
    b"\xff",
    b"\xfe\xff",
    b"\x80",
    b"\xbf",
    b"\xc3\x28",
    b"\xc0\xaf",
    b"\xe0\x80\xaf",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xe2\x82",
    b"\xf0\x28\x8c\xbc",
    b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"caf\xe9",
]


@st.composite
def invalid_utf8_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    payload, _, _ = draw(own_request())
    bad = draw(st.sampled_from(INVALID_UTF8))
    if draw(st.booleans()):
        payload = draw(with_hole(payload))
        mutation: Mutation = Splice(bad)
    else:  # between tokens
        mutation = Swap(b'"params":', b'"params":' + bad)
    return Case(
        "invalid_utf8", actor or draw(actors), payload, (mutation,), expect=NOT_JSON, note=repr(bad)
    )


def nested(depth: int, shape: str) -> bytes:
    if shape == "arrays":
        return b"[" * depth + b"]" * depth
    if shape == "objects":
        return b'{"a":' * depth + b"1" + b"}" * depth
    if shape == "mixed":
        half = depth // 2
        return b'[{"a":' * half + b"null" + b"}]" * half
    return b"[" * depth  # unclosed


ANY_SLOTS = {
    "threads.add_client_tool_output": ("params", "result"),
    "threads.custom_action": ("params", "action", "payload"),
}


@st.composite
def deep_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    actor = actor or draw(actors)
    shape = draw(st.sampled_from(["arrays", "objects", "mixed", "unclosed"]))
    deep = draw(st.booleans())
    depth = (
        draw(st.integers(1000, 20000) | st.sampled_from([1000, 10_000, 20_000]))
        if deep
        else draw(st.integers(1, 150))
    )
    if deep and shape != "unclosed" and draw(st.integers(0, 4)) == 0:
        return Case(
            "deep_nesting",
            actor,
            None,
            (Raw(nested(depth, shape)),),
            expect=NOT_JSON,
            note=f"root {shape} {depth}",
        )
    payload, status, code = draw(own_request())
    slots: list[Path] = [("metadata",), ("params", "x_extra")]
    if payload["type"] in ANY_SLOTS:
        slots.append(ANY_SLOTS[payload["type"]])
    if payload["type"] not in ("threads.list", "attachments.create", "input.transcribe"):
        slots.append(("params",))
    slot = draw(st.sampled_from(slots))
    payload = set_at(payload, slot, HOLE)
    expect = (
        NOT_JSON
        if deep or shape == "unclosed"
        else replace(expect_status(status, code), oracle=True)
    )
    return Case(
        "deep_nesting",
        actor,
        payload,
        (Splice(nested(depth, shape), value=True),),
        expect=expect,
        note=f"{'.'.join(slot)} {shape} {depth}",
    )


@st.composite
def huge_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    size = draw(st.integers(BODY_LIMIT + 1, 4 * BODY_LIMIT) | st.just(BODY_LIMIT + 1))
    kind = draw(st.sampled_from(["threads.create", "threads.add_user_message", "threads.update"]))
    if kind == "threads.update":
        params: dict[str, Any] = {"thread_id": R("thread"), "title": HOLE}
    else:
        params = {
            "input": {
                "content": [{"type": "input_text", "text": HOLE}],
                "attachments": [],
                "inference_options": {},
            }
        }
        if kind == "threads.add_user_message":
            params["thread_id"] = R("thread")
    transport = draw(st.sampled_from(["length", "chunked"]))
    headers: tuple[tuple[str, Any], ...] = ()
    if transport == "length" and draw(st.integers(0, 3)) == 0:
        headers = (("Content-Length", str(draw(st.integers(0, BODY_LIMIT)))),)  # understated
    return Case(
        "huge_body",
        actor or draw(actors),
        {"type": kind, "params": params},
        (PadTo(size),),
        expect=refused(413, "payload_too_large"),
        transport=transport,
        headers=headers,
        note=f"{size} bytes, {transport}",
    )


CLASS_STRATEGIES = {
    "well_formed": well_formed_case,
    "foreign_ids": foreign_case,
    "unknown_ids": unknown_ids_case,
    "bad_limits": bad_limit_case,
    "bad_cursors": bad_cursor_case,
    "wrong_types": wrong_type_case,
    "missing_params": missing_params_case,
    "extra_fields": extra_fields_case,
    "unknown_type": unknown_type_case,
    "non_object": non_object_case,
    "malformed_json": malformed_json_case,
    "unstorable_text": unstorable_case,
    "invalid_utf8": invalid_utf8_case,
    "deep_nesting": deep_case,
    "huge_body": huge_case,
}
assert set(CLASS_STRATEGIES) == set(CLASSES)


@st.composite
def sequences(draw: st.DrawFn) -> list[Case]:
    """A few cases of any classes by one actor, run in a row without a reset in between."""
    actor = draw(actors)
    n = draw(st.integers(1, 4))
    return [
        draw(st.sampled_from(CLASSES).flatmap(lambda c: CLASS_STRATEGIES[c](actor)))
        for _ in range(n)
    ]


# --- the properties ------------------------------------------------------------------------

SCALE = float(os.environ.get("HOSTILE_EXAMPLES", "1"))


def hostile(examples: int) -> Any:
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


@hostile(30)
@given(case=well_formed_case())
async def test_property_well_formed(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(40)
@given(case=foreign_case())
async def test_property_foreign_ids(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(25)
@given(case=unknown_ids_case())
async def test_property_unknown_ids(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(25)
@given(case=bad_limit_case())
async def test_property_bad_limits(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(25)
@given(case=bad_cursor_case())
async def test_property_bad_cursors(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(30)
@given(case=wrong_type_case())
async def test_property_wrong_types(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(25)
@given(case=missing_params_case())
async def test_property_missing_params(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(25)
@given(case=extra_fields_case())
async def test_property_extra_fields(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(20)
@given(case=unknown_type_case())
async def test_property_unknown_type(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(20)
@given(case=non_object_case())
async def test_property_non_object(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(25)
@given(case=malformed_json_case())
async def test_property_malformed_json(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(30)
@given(case=unstorable_case())
async def test_property_unstorable_text(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(25)
@given(case=invalid_utf8_case())
async def test_property_invalid_utf8(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(25)
@given(case=deep_case())
async def test_property_deep_nesting(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(15)
@given(case=huge_case())
async def test_property_huge_body(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(25)
@given(cases=sequences())
async def test_property_mixed_sequences(world: World, cases: list[Case]) -> None:
    """Cases of every class in a row (deletes, retries and replies change the state between
    them): the invariants that do not depend on the seeded state hold throughout."""
    await run_example(world, cases)


# --- explicit cases ------------------------------------------------------------------------


def req(type_: str, **params: Any) -> dict[str, Any]:
    return {"type": type_, "params": params}


def msg(text: Any, *attachments: Any, **extra: Any) -> dict[str, Any]:
    return {
        "content": [{"type": "input_text", "text": text}],
        "attachments": list(attachments),
        "inference_options": {},
        **extra,
    }


def V(name: str) -> Ref:
    return Ref("victim", name)


def M(name: str) -> Ref:
    return Ref("missing", name)


def X(payload: Any, expect: Expect, note: str = "", **kw: Any) -> dict[str, Any]:
    """One explicit case (its class and actor are filled in by ``_explicit``)."""
    return {"payload": payload, "expect": expect, "note": note, **kw}


def _limit_expect(limit: Any) -> Expect:
    status, bound = limit_outcome(limit)
    return expect_status(200, max_items=bound) if status == 200 else refused()


OK = expect_status(200)
UNSUPPORTED_400 = expect_status(400, "unsupported")
HUGE = refused(413, "payload_too_large")
T1, T2 = R("thread"), R("thread2")
ACTION = {"type": "x"}


def _explicit() -> dict[str, list[Case]]:
    big = req("threads.create", input=msg(HOLE))
    title = req("threads.update", thread_id=T1, title=HOLE)
    hole = req("threads.create", input=msg(HOLE))
    tag = {"type": "input_tag", "id": "t", "text": "t", "data": {"a": ["\x00"]}}
    rows: dict[str, list[dict[str, Any]]] = {
        "well_formed": [
            X(req("threads.list"), OK),
            X(req("threads.list", limit=1, order="asc"), expect_status(200, max_items=1)),
            X(req("items.list", thread_id=T2, limit=3), expect_status(200, max_items=3)),
            X(req("threads.get_by_id", thread_id=T2), OK),
            X(req("threads.create", input=msg("emoji \U0001f600")), OK, "pair", ascii_json=True),
            X(req("threads.create", input=msg("files", R("attachment"), R("image"))), OK),
            X(req("threads.add_user_message", thread_id=T1, input=msg("more")), OK),
            X(req("threads.add_user_message", thread_id=T2, input=msg("x")), OK),
            X(req("threads.update", thread_id=T1, title="Ünïcödé ✓ \u202e title"), OK),
            X(
                req("items.feedback", thread_id=T1, item_ids=[R("question")], kind="negative"),
                OK,
            ),
            X(req("threads.retry_after_item", thread_id=T2, item_id=R("question2")), OK),
            X(req("threads.add_client_tool_output", thread_id=T2, result={"ok": True}), OK),
            X(
                req(
                    "threads.add_structured_input",
                    thread_id=T2,
                    item_id=R("structured"),
                    input={"answers": {"q1": {"values": ["a"]}, "zz": {"values": []}}},
                ),
                OK,
            ),
            X(req("threads.delete", thread_id=T2), OK),
            X(req("attachments.delete", attachment_id=R("attachment")), OK),
            X(req("attachments.create", name="../../x", size=10, mime_type="text/plain"), OK),
            X(
                req("threads.custom_action", thread_id=T2, item_id=R("widget"), action=ACTION),
                UNSUPPORTED_400,
            ),
            X(
                req("input.transcribe", audio_base64="AAAA", mime_type="audio/webm"),
                UNSUPPORTED_400,
            ),
        ],
        "foreign_ids": [
            X(req("threads.get_by_id", thread_id=V("thread")), NOT_FOUND),
            X(req("threads.update", thread_id=V("thread"), title="pwned"), NOT_FOUND),
            X(req("threads.delete", thread_id=V("thread2")), NOT_FOUND),
            X(req("items.list", thread_id=V("thread")), NOT_FOUND),
            X(req("items.list", thread_id=T1, after=V("question")), NOT_FOUND),
            X(req("threads.list", after=V("thread")), NOT_FOUND),
            X(
                req(
                    "items.feedback",
                    thread_id=T1,
                    item_ids=[R("reply"), V("reply")],
                    kind="positive",
                ),
                NOT_FOUND,
            ),
            X(
                req("items.feedback", thread_id=V("thread"), item_ids=[], kind="positive"),
                NOT_FOUND,
            ),
            X(req("threads.add_user_message", thread_id=V("thread"), input=msg("hi")), NOT_FOUND),
            X(
                req("threads.add_user_message", thread_id=T1, input=msg("hi", V("attachment"))),
                NOT_FOUND,
            ),
            X(req("threads.create", input=msg("hi", R("attachment"), V("image"))), NOT_FOUND),
            X(req("threads.retry_after_item", thread_id=T1, item_id=V("question")), NOT_FOUND),
            X(
                req("threads.retry_after_item", thread_id=V("thread"), item_id=V("question")),
                NOT_FOUND,
            ),
            X(req("threads.add_client_tool_output", thread_id=V("thread2"), result={}), NOT_FOUND),
            X(
                req(
                    "threads.add_structured_input",
                    thread_id=T2,
                    item_id=V("structured"),
                    input={"answers": {}},
                ),
                NOT_FOUND,
            ),
            X(
                req("threads.sync_custom_action", thread_id=T2, item_id=V("widget"), action=ACTION),
                NOT_FOUND,
            ),
            X(req("threads.custom_action", thread_id=V("thread2"), action=ACTION), NOT_FOUND),
            X(req("attachments.delete", attachment_id=V("image")), NOT_FOUND),
            X(
                {
                    "type": "threads.get_by_id",
                    "params": {"thread_id": V("thread"), "user_id": V("@user")},
                    "user_id": V("@user"),
                    "metadata": {"user_id": V("@user")},
                },
                NOT_FOUND,
                "identity claims",
                headers=(("X-User-Id", V("@user")), ("X-Forwarded-User", V("@user"))),
            ),
            X(req("threads.create", input=msg(Tpl(("about ", V("thread"))))), OK, "id as text"),
            X(req("threads.update", thread_id=T1, title=Tpl(("see ", V("reply")))), OK, "as title"),
        ],
        "unknown_ids": [
            X(req("threads.get_by_id", thread_id=M("thread")), NOT_FOUND),
            X(req("threads.get_by_id", thread_id=R("question")), NOT_FOUND),
            X(req("threads.get_by_id", thread_id=""), NOT_FOUND),
            X(req("items.list", thread_id=T1, after=R("question2")), NOT_FOUND),
            X(req("threads.retry_after_item", thread_id=T1, item_id=R("question2")), NOT_FOUND),
            X(
                req("items.feedback", thread_id=T1, item_ids=[R("reply2")], kind="positive"),
                NOT_FOUND,
            ),
            X(req("attachments.delete", attachment_id=T1), NOT_FOUND),
            X(req("threads.create", input=msg("x", T1)), NOT_FOUND),
            X(req("threads.delete", thread_id=M("thread2")), NOT_FOUND),
        ],
        "bad_limits": [
            X(req("threads.list", limit=v), _limit_expect(v), repr(v))
            for v in (-1, 0, 1, 10**30, 2**63, -(2**63), 2.5, 3.0, "ten", "3", True, None, [], {})
        ]
        + [
            X(req("items.list", thread_id=T2, limit=-5), refused()),
            X(req("threads.list", limit=5), refused(), "1e400", mutations=(Swap(b"5", b"1e400"),)),
            X(req("threads.list", limit=5), refused(), "NaN", mutations=(Swap(b"5", b"NaN"),)),
            X(req("threads.list", order="sideways"), refused()),
        ],
        "bad_cursors": [
            X(req("threads.list", after=""), NOT_FOUND),
            X(req("threads.list", after="x" * 5000), NOT_FOUND),
            X(req("threads.list", after="' OR '1'='1' --"), NOT_FOUND),
            X(req("threads.list", after="%"), NOT_FOUND),
            X(req("threads.list", after=M("thread")), NOT_FOUND),
            X(req("threads.list", after=R("question")), NOT_FOUND),
            X(req("threads.list", after=V("thread2")), NOT_FOUND),
            X(req("items.list", thread_id=T1, after=T1), NOT_FOUND),
            X(req("threads.list", after=123), refused()),
            X(req("threads.list", after={"id": T1}), refused()),
            X(req("threads.list", after=[T1]), refused()),
            X(req("threads.list", after="\x00"), refused()),
            X(req("threads.list", after=T1), OK),
            X(req("items.list", thread_id=T2, after=R("widget"), order="asc"), OK),
        ],
        "wrong_types": [
            X(req("threads.get_by_id", thread_id=123), refused()),
            X(req("threads.get_by_id", thread_id=None), refused()),
            X(req("threads.get_by_id", thread_id=[T1]), refused()),
            X(req("threads.get_by_id", thread_id={"id": T1}), refused()),
            X(req("threads.update", thread_id=T1, title=None), refused()),
            X(req("threads.update", thread_id=T1, title=5), refused()),
            X(req("items.feedback", thread_id=T1, item_ids=R("reply"), kind="positive"), refused()),
            X(req("items.feedback", thread_id=T1, item_ids=[1], kind="positive"), refused()),
            X(req("items.feedback", thread_id=T1, item_ids=[], kind=1), refused()),
            X(req("items.feedback", thread_id=T1, item_ids=[], kind="meh"), refused()),
            X(req("threads.create", input="hello"), refused()),
            X(req("threads.create", input={**msg("x"), "content": {}}), refused()),
            X(req("threads.create", input={**msg("x"), "attachments": "atc_1"}), refused()),
            X(req("threads.create", input=msg(1)), refused()),
            X({"type": "threads.list", "params": []}, refused()),
            X({"type": "threads.list", "params": {}, "metadata": []}, refused()),
            X({"type": "threads.list", "params": {}, "metadata": "x"}, refused()),
            X(req("threads.list", order=1), refused()),
        ],
        "missing_params": [
            X({"type": "threads.create"}, refused()),
            X({"type": "threads.list"}, refused()),
            X({"type": "threads.get_by_id", "params": None}, refused()),
            X(req("threads.add_user_message", thread_id=T1), refused()),
            X(req("threads.add_user_message", input=msg("x")), refused()),
            X(req("threads.create", input={"content": [], "inference_options": {}}), refused()),
            X(req("threads.create", input={"attachments": [], "inference_options": {}}), refused()),
            X(req("threads.create", input={"content": [], "attachments": []}), refused()),
            X(req("items.feedback", thread_id=T1, item_ids=[]), refused()),
            X(
                req("threads.add_structured_input", thread_id=T2, item_id=R("structured")),
                refused(),
            ),
            X(req("threads.custom_action", thread_id=T2), refused()),
            X(req("threads.add_client_tool_output", thread_id=T2), refused()),
            X(req("threads.list"), OK, "all of threads.list's params are optional"),
        ],
        "extra_fields": [
            X({**req("threads.list"), "user_id": V("@user")}, OK),
            X(req("threads.get_by_id", thread_id=T1, user_id=V("@user")), OK),
            X({**req("threads.list"), "__proto__": {"admin": True}, "constructor": {}}, OK),
            X(req("threads.create", input={**msg("x"), "owner": V("@user"), "x": 1}), OK),
            X(req("threads.list", limit=2, extra=[1, 2, {"a": None}]), OK),
            X(
                req("threads.list"),
                OK,
                "identity headers",
                headers=(("X-User-Id", V("@user")), ("X-Remote-User", V("@user"))),
            ),
        ],
        "unknown_type": [
            X(payload, refused(field="type"))
            for payload in (
                req("threads.hack"),
                req(""),
                req("THREADS.LIST"),
                req(" threads.list"),
                req("threads.list\x00"),
                {"type": None, "params": {}},
                {"type": 42, "params": {}},
                {"type": [], "params": {}},
                {"type": {"$ne": ""}, "params": {}},
                {"params": {}},
            )
        ],
        "non_object": [
            X(v, refused(message="must be a JSON object"))
            for v in ([], [req("threads.list")], "threads.list", 1, 1.5, None, True, False)
        ],
        "malformed_json": [
            X(None, NOT_JSON, repr(raw), mutations=(Raw(raw),))
            for raw in (
                b"",
                b" ",
                b"{",
                b"}",
                b"nul",
                b'{"type": "threads.list", "params": {}',
                b"{'type': 'threads.list', 'params': {}}",
                b'{"type": "threads.list", "params": {},}',
                b'/**/{"type": "threads.list", "params": {}}',
                b'\xef\xbb\xbf{"type": "threads.list", "params": {}}',
                b'{"type": "threads.list", "params": {}} x',
                b'{"type": "threads.list", "params": {}}{}',
                b'{"type": "threads.\nlist", "params": {}}',
                b"\x00",
                b'{"type": "threads.list", "params": {"after": "\\x41"}}',
            )
        ],
        "unstorable_text": [
            X(req("threads.create", input=msg("nul \x00 escaped")), refused(message="NUL")),
            X(hole, refused(), "raw NUL", mutations=(Splice(b"\x00"),)),
            X(req("threads.update", thread_id=T1, title="\ud800"), refused(), ascii_json=True),
            X(req("threads.update", thread_id=T1, title="x\udfff"), refused(), ascii_json=True),
            X(title, refused(), "reversed pair", mutations=(Splice(b"\\ude00\\ud83d"),)),
            X({**req("threads.list"), "metadata": {"k\x00": 1}}, refused()),
            X(req("threads.get_by_id", thread_id=Tpl((T1, "\x00"))), refused()),
            X(req("threads.create", input=msg("q", quoted_text="\x00")), refused()),
            X(req("threads.create", input={**msg("t"), "content": [tag]}), refused()),
            X(
                req(
                    "threads.add_structured_input",
                    thread_id=T2,
                    item_id=R("structured"),
                    input={"answers": {"q1\x00": {"values": ["a"]}}},
                ),
                refused(),
            ),
        ],
        "invalid_utf8": [
            X(hole, NOT_JSON, repr(bad), mutations=(Splice(bad),))
            for bad in (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80")
        ]
        + [
            X(hole, NOT_JSON, "latin-1", mutations=(Splice("café".encode("latin-1")),)),
            X(req("threads.list"), NOT_JSON, "between tokens", mutations=(Swap(b"{", b"{\x80"),)),
            X(req("threads.update", thread_id=T1, title="x\ud800"), NOT_JSON, "CESU-8 surrogate"),
        ],
        "deep_nesting": [
            X(None, NOT_JSON, "root arrays", mutations=(Raw(nested(10_000, "arrays")),)),
            X(None, NOT_JSON, "root objects", mutations=(Raw(nested(10_000, "objects")),)),
            X(
                {**req("threads.list"), "metadata": HOLE},
                NOT_JSON,
                "metadata",
                mutations=(Splice(nested(10_000, "objects"), value=True),),
            ),
            X(
                req("threads.add_client_tool_output", thread_id=T2, result=HOLE),
                NOT_JSON,
                "tool output",
                mutations=(Splice(nested(20_000, "arrays"), value=True),),
            ),
            X(
                {"type": "threads.get_by_id", "params": HOLE},
                NOT_JSON,
                "params",
                mutations=(Splice(nested(10_000, "mixed"), value=True),),
            ),
            X(
                {**req("threads.list"), "metadata": HOLE},
                NOT_JSON,
                "unclosed",
                mutations=(Splice(nested(10_000, "unclosed"), value=True),),
            ),
            X(
                req("threads.add_client_tool_output", thread_id=T2, result=HOLE),
                OK,
                "100 deep, stored",
                mutations=(Splice(nested(100, "arrays"), value=True),),
            ),
            X(
                {**req("threads.list"), "metadata": {"a": HOLE}},
                OK,
                "150 deep",
                mutations=(Splice(nested(150, "objects"), value=True),),
            ),
        ],
        "huge_body": [
            X(big, HUGE, "limit + 1", mutations=(PadTo(BODY_LIMIT + 1),)),
            X(
                big,
                HUGE,
                "limit + 1, chunked",
                mutations=(PadTo(BODY_LIMIT + 1),),
                transport="chunked",
            ),
            X(
                big,
                HUGE,
                "4 x limit, chunked",
                mutations=(PadTo(4 * BODY_LIMIT),),
                transport="chunked",
            ),
            X(
                big,
                HUGE,
                "understated Content-Length",
                mutations=(PadTo(BODY_LIMIT + 1),),
                headers=(("Content-Length", "10"),),
            ),
            X(
                req("threads.list"),
                HUGE,
                "overstated Content-Length",
                headers=(("Content-Length", str(10**12)),),
            ),
            X(
                req("threads.list"),
                refused(message="Content-Length"),
                "malformed Content-Length",
                headers=(("Content-Length", "abc"),),
            ),
            X(title, OK, "exactly the limit", mutations=(PadTo(BODY_LIMIT),)),
            X(
                title,
                OK,
                "exactly the limit, chunked",
                mutations=(PadTo(BODY_LIMIT),),
                transport="chunked",
            ),
        ],
    }
    explicit = {cls: [Case(cls, ALICE_ID, **row) for row in rows[cls]] for cls in CLASSES}
    # The same from bob's side, for a few.
    for cls in ("foreign_ids", "unknown_ids", "well_formed"):
        explicit[cls] += [
            replace(c, actor=BOB_ID, note=f"{c.note} (as bob)".strip()) for c in explicit[cls][:3]
        ]
    return explicit


EXPLICIT = _explicit()


@pytest.mark.parametrize("cls", CLASSES)
async def test_explicit_cases(world: World, cls: str) -> None:
    """Hand-picked cases of each class, each from the seeded state; all failures reported."""
    failures = []
    for case in EXPLICIT[cls]:
        try:
            await run_example(world, [case])
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {len(EXPLICIT[cls])} failed:\n\n" + "\n\n".join(
        failures
    )


# --- the Reliability table -----------------------------------------------------------------


def reliability_table() -> str:
    """Cases per input class: answers by status class, streams carrying a ChatKit error event,
    twins compared (victim id vs missing id) and what was lost (failed checks, by kind)."""
    columns = ("cases", "2xx", "4xx", "5xx", "stream_errors", "twins")
    width = {c: max(len(c), 5) + 2 for c in columns}
    header = f"{'input class':<16}" + "".join(f"{c:>{width[c]}}" for c in columns) + "  lost"
    lines = [header, "-" * len(header)]
    total: Counter[str] = Counter()
    for name in (*CLASSES, "total"):
        c = total if name == "total" else STATS[name]
        total.update({} if name == "total" else c)
        if name == "total":
            lines.append("-" * len(header))
        lost = ", ".join(f"{k} {c[k]}" for k in LOSSES if c[k]) or "nothing"
        lines.append(f"{name:<16}" + "".join(f"{c[k]:>{width[k]}}" for k in columns) + f"  {lost}")
    return "\n".join(lines)


def test_zz_reliability_summary(
    request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    """Print cases per input class and what was lost; runs last (pytest keeps file order)."""
    module = sys.modules[__name__]
    defined = {name for name in vars(module) if name.startswith("test_")}
    selected = {
        getattr(item, "originalname", item.name)
        for item in request.session.items
        if getattr(item, "module", None) is module
    }
    with capsys.disabled():
        print("\n\nHostile input (tests/test_hostile.py): cases per input class\n")
        print(reliability_table())
        print()
    lost = {cls: {k: STATS[cls][k] for k in LOSSES if STATS[cls][k]} for cls in CLASSES}
    assert not any(lost.values()), lost
    if defined <= selected:  # the whole module ran: every class must have been exercised
        empty = [cls for cls in CLASSES if STATS[cls]["cases"] == 0]
        assert not empty, f"no cases ran for {empty}"
