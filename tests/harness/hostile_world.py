"""The hostile-input suite's world and checks (tests/hostile/test_hostile.py explains the suite): the two
seeded users, payload placeholders and byte mutations, snapshots and restore, and the checks
every answer must pass."""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
from chatkit.types import (
    ChatKitReq,
    ClientToolCallItem,
    StructuredInputItem,
    ThreadStreamEvent,
    WidgetItem,
)
from pydantic import SecretStr, TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.main import create_app
from app.pg.pool import ConnectionPool
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness import factories as f
from tests.harness.chatkit_client import JWT_TEST_SECRET, ChatKitClient, done_items, parse_sse
from tests.harness.loopback import serve

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
IMAGE_IN = "thread"  # the thread "image" was sent in: the one thread that may send it again
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
    image = f.image_attachment(thread_id=ids[IMAGE_IN])
    for a in (attachment, image):
        await store.save_attachment(a, ctx)
    ids.update(attachment=attachment.id, image=image.id)
    await store.save_feedback(ids["thread"], [ids["reply"]], "positive", ctx)
    await raw.execute("SELECT set_config('app.user_id', $1, false)", user)
    pdf = f"%PDF-1.4 {MARKER[user]}".encode()
    await raw.execute(
        "INSERT INTO chatkit_attachment_blobs (user_id, attachment_id, chunk_no, data) "
        "VALUES ($1, $2, 0, $3)",
        user,
        attachment.id,
        pdf,
    )
    await raw.execute(  # uploaded: downloads and previews serve it (the image stays pending)
        "UPDATE chatkit_attachments SET status = 'ready', size_bytes = $3, "
        "mime_type = 'application/pdf' WHERE user_id = $1 AND id = $2",
        user,
        attachment.id,
        len(pdf),
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


@asynccontextmanager
async def seeded_world(
    test_settings: Settings, engine: AsyncEngine, pool: ConnectionPool, *, live: bool = False
) -> AsyncIterator[World]:
    """One started app and one seeded world (tests/hostile/test_hostile.py's module-scoped ``world``;
    ``make_client`` does the same per test, but starting, seeding and stopping per property
    would cost about 1.5 s each). Examples put the actor's rows back, so each test still starts
    from the seeded state."""
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
        if live:  # the same app behind uvicorn on loopback: every request crosses real HTTP
            url = await stack.enter_async_context(serve(app, lifespan="off"))
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=30))
        else:
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
            if event.get("code") == "stream.error":  # a 500 inside the stream
                answer.fail("5xx", "a stream.error event (an unexpected exception)")
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
