"""The field fuzzer of the hostile-input suite (tests/hostile/test_hostile_fuzz.py runs it; the world and
its checks are tests/harness/hostile_world.py): well-formed requests of every type of the SDK's
protocol and of every ``/files`` route, with one or two fields replaced by a hostile value.

* The request types are those of the SDK's ``ChatKitReq`` union, and the fields that can be
  replaced are every field of the SDK's model of that type (an optional field absent from the
  request is added), plus whatever the request holds inside free-form fields.
* Hostile values: a few KB of random text (incompressible: PostgreSQL compresses long key
  values, so repetitive text hides a too-long key), NUL, lone surrogates, look-alike digits
  (``²``, Arabic-Indic), integers at and beyond the int64 edges, 5,000-digit integers, floats
  (``1e400``, ``NaN``), deep nesting and values of the wrong JSON type.
* ``/files``: the path's id, the signed URL's ``u``, ``e`` and ``s`` (a real signature for the
  actor's file), the bearer token, ``Content-Type``, the multipart file name and the body.

What each must get is stated where the service decides it (an id longer than
``app.ids.MAX_ID_CHARS``: 400; a tampered signed URL: 403) and otherwise left to the checks
every answer passes: never a 5xx (nor a ``stream.error`` event), a JSON error body, no leak,
no change to the other user's rows, no partial write. Also here: the suite's Hypothesis
settings and its Reliability table, shared by both modules.
"""

from __future__ import annotations

import json
import os
import random
import string
import sys
import typing
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, unquote, urlencode

import httpx
from chatkit.types import ChatKitReq
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from app.ids import ID_FIELDS, MAX_ID_CHARS
from tests.harness.hostile_cases import actors, json_values, nested, own_request
from tests.harness.hostile_world import (
    ATTACHMENTS,
    DATA_TABLES,
    HOLE,
    LOSSES,
    STATS,
    USERS,
    Answer,
    Case,
    ExampleLog,
    Expect,
    Path,
    Ref,
    Splice,
    World,
    _db_problems,
    check_text,
    data_of,
    get_at,
    read_answer,
    refused,
    set_at,
    walk,
)

# --- the suite's settings and table ---------------------------------------------------------


# The budget's scale (``HOSTILE_EXAMPLES``) and whether to explore new examples instead of the
# derandomized ones (``HOSTILE_RANDOM=1``): read once, for every hostile suite.
SCALE = float(os.environ.get("HOSTILE_EXAMPLES", "1"))
EXPLORE = os.environ.get("HOSTILE_RANDOM", "") not in ("", "0")


def hostile(examples: int, scale: float = SCALE, explore: bool = EXPLORE) -> Any:
    """Hypothesis settings of the hostile suite: ``examples`` x ``scale`` examples, no deadline
    (a request's time is not the property), no example database; the same examples every run
    (derandomized: CI never flakes and a failure recurs) unless ``explore``."""
    return settings(
        max_examples=max(1, round(examples * scale)),
        deadline=None,
        database=None,
        print_blob=True,
        derandomize=not explore,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


def reliability_table(classes: tuple[str, ...]) -> str:
    """Cases per input class: answers by status class, streams carrying a ChatKit error event,
    twins compared (victim id vs missing id) and what was lost (failed checks, by kind)."""
    columns = ("cases", "2xx", "4xx", "5xx", "stream_errors", "twins")
    width = {c: max(len(c), 5) + 2 for c in columns}
    header = f"{'input class':<16}" + "".join(f"{c:>{width[c]}}" for c in columns) + "  lost"
    lines = [header, "-" * len(header)]
    total: Counter[str] = Counter()
    for name in (*classes, "total"):
        c = total if name == "total" else STATS[name]
        total.update({} if name == "total" else c)
        if name == "total":
            lines.append("-" * len(header))
        lost = ", ".join(f"{k} {c[k]}" for k in LOSSES if c[k]) or "nothing"
        lines.append(f"{name:<16}" + "".join(f"{c[k]:>{width[k]}}" for k in columns) + f"  {lost}")
    return "\n".join(lines)


# --- the SDK's request models -----------------------------------------------------------------

EACH = "[]"
"""In a field path: every element of a list (or value of a dict)."""


def request_models() -> list[type[BaseModel]]:
    """Every request type of the SDK's protocol (the ``ChatKitReq`` union)."""
    return list(typing.get_args(typing.get_args(ChatKitReq)[0]))


SDK_TYPES = {m.model_fields["type"].default: m for m in request_models()}


def field_paths(model: type[BaseModel], path: Path = ()) -> Iterator[Path]:
    """Every field of ``model`` and of the models it holds, as paths (``EACH`` for elements)."""
    hints = typing.get_type_hints(model, vars(sys.modules[model.__module__]))
    for name in model.model_fields:
        yield (*path, name)
        stack: list[tuple[Any, Path]] = [(hints[name], (*path, name))]
        while stack:
            tp, at = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                yield from field_paths(tp, at)
                continue
            origin = typing.get_origin(tp)
            args = typing.get_args(tp)
            if origin in (list, dict) and args:
                yield (*at, EACH)
                stack.append((args[-1], (*at, EACH)))
            else:
                stack.extend((arg, at) for arg in args)


def sites(payload: dict[str, Any]) -> list[Path]:
    """Where a value can be replaced: each SDK field of the request's type (elements of lists
    the request holds, optional fields it lacks), and everything inside free-form values."""
    out: set[Path] = set()
    for sdk_path in field_paths(SDK_TYPES[payload["type"]]):
        out.update(_concrete(payload, sdk_path))
    out.update(p for p, _ in walk(payload) if p)
    return sorted(out, key=repr)


def _concrete(payload: Any, sdk_path: Path) -> Iterator[Path]:
    if not sdk_path:
        yield ()
        return
    head, rest = sdk_path[0], sdk_path[1:]
    if head == EACH:
        keys: list[Any] = []
        if isinstance(payload, list):
            keys = list(range(len(payload)))
        elif isinstance(payload, dict):
            keys = list(payload)
        for key in keys[:2]:
            yield from ((key, *p) for p in _concrete(payload[key], rest))
    elif isinstance(payload, dict):
        if head in payload:
            yield from ((head, *p) for p in _concrete(payload[head], rest))
        elif not rest:
            yield (head,)  # an optional field the request does not have


FREE_FIELDS = {"text", "title", "quoted_text", "data", "result", "payload", "metadata", "name"}
"""SDK fields (and what is inside them) that hold the user's text or any JSON."""


def id_patterns(kind: str) -> list[Path]:
    """The SDK's id fields of a request type (``app.ids.ID_FIELDS``) and their elements."""
    out = []
    for path in field_paths(SDK_TYPES[kind]):
        named = [p for p in path if p != EACH]
        if named[-1] in ID_FIELDS:
            out.append(path)
    return out


def is_id_slot(kind: str, path: Path) -> bool:
    """``path`` is an id field of a ``kind`` request, or an element of one."""
    return any(
        len(pattern) == len(path)
        and all(
            p == q or (p == EACH and isinstance(q, int)) for p, q in zip(pattern, path, strict=True)
        )
        for pattern in id_patterns(kind)
    )


# --- hostile values ----------------------------------------------------------------------------

ALPHABET = "".join(
    [string.ascii_letters, string.digits, "-_.:", "\u0301\u202e\u200b\ufeff"]
    + [chr(c) for c in (*range(0xC0, 0x180), *range(0x400, 0x500), *range(0x4E00, 0x5000))]
    + [chr(c) for c in range(0x1F600, 0x1F650)]
)
"""Latin, Cyrillic, CJK, emoji, combining and invisible marks: ~1,700 characters, so random
text of it barely compresses."""


def random_text(length: int, seed: int) -> str:
    """Incompressible text of ``length`` characters from a seed (cheap for Hypothesis)."""
    return "".join(random.Random(seed).choices(ALPHABET, k=length))


huge_texts = st.builds(
    random_text,
    # Long first: Hypothesis favours the first choice, and a few KB is what overflows a key.
    st.sampled_from([3000, 12_000, 1000, MAX_ID_CHARS + 1]) | st.integers(MAX_ID_CHARS, 12_000),
    st.integers(0, 2**32),
)
INT64 = 2**63
EDGE_INTS = [0, -1, 2**31 - 1, 2**31, 2**32, INT64 - 1, INT64, -INT64, -INT64 - 1, 2**64, 10**30]
EDGE_FLOATS = [1e308, -1e308, 5e-324, -0.0, 0.5, 1.5, float(INT64)]
LOOKALIKE_DIGITS = [
    *("²", "1²", "١٢٣", "\uff11\uff12", "⑦"),  # digits to str.isdigit(), or to int() too
    *("1_000", " 7", "7 ", "+7", "-7", "0x1f", "1e3"),  # accepted by int() or float()
]
marked_texts = st.builds(
    lambda text, mark, at: text[:at] + mark + text[at:],
    st.text(max_size=12),
    st.sampled_from(["\x00", "\ud800", "\udfff", "\ud83d", "\x00\ud800"]),
    st.integers(0, 12),
)


def hostile_text(texts: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        texts,
        marked_texts,
        st.sampled_from(LOOKALIKE_DIGITS),
        st.sampled_from(["", " ", "..", "%00", "null", "' OR 1=1 --", "\\", "/"]),
        st.sampled_from(EDGE_INTS).map(str),
        st.just("9" * 5000),
    )


hostile_strings = hostile_text(huge_texts)
url_strings = hostile_text(
    # A URL or a header carries less (httpx: 64 KiB; nginx: 8 KiB a line): up to ~18 KB here.
    st.builds(random_text, st.integers(MAX_ID_CHARS + 1, 2000), st.integers(0, 2**32))
)
hostile_ids = st.one_of(huge_texts, huge_texts, huge_texts, hostile_strings)
"""For the fields that name stored objects: mostly longer than any id."""
hostile_json = st.one_of(
    hostile_strings,
    st.sampled_from(EDGE_INTS),
    st.sampled_from(EDGE_FLOATS),
    st.floats(allow_nan=False, allow_infinity=False),
    json_values,  # wrong types, small nesting
    st.builds(lambda n, v: [v] * n, st.integers(100, 2000), st.integers(0, 9)),  # long arrays
)
RAW_VALUES = [
    b"9" * 5000,  # beyond Python's int-parsing limit (4,300 digits)
    b"-" + b"9" * 5000,
    b"1e400",
    b"-1e400",
    b"NaN",
    b"Infinity",
    b"9223372036854775808",
    b"1.0e-400",
    nested(60, "arrays"),
    nested(400, "objects"),
    nested(3000, "mixed"),
]
"""JSON values Python's json.dumps cannot write (spliced into the body in place of a hole)."""


# --- /chatkit: one or two fields of a valid request replaced ---------------------------------


@st.composite
def field_case(draw: st.DrawFn, actor: str | None = None) -> Case:
    """A valid request with one or two fields replaced: a third of the time one of its ids
    (the fields that reach SQL as keys, given hostile text), a third of the time a free-form
    field (text, titles, tool output, metadata: most such requests are served), else any."""
    payload, _, _ = draw(own_request())
    places = sites(payload)
    kind = payload["type"]
    ids = [p for p in places if is_id_slot(kind, p)]
    free = [p for p in places if FREE_FIELDS & {x for x in p if isinstance(x, str)}]
    mode = draw(st.sampled_from(["id", "free", "any"]))
    id_mode = mode == "id" and bool(ids)
    if id_mode:
        chosen = [draw(st.sampled_from(ids))]
    elif mode == "free" and free:
        chosen = [draw(st.sampled_from(free))]
    else:
        chosen = draw(st.lists(st.sampled_from(places), min_size=1, max_size=2, unique=True))
    out: Any = payload
    mutations: list[Splice] = []
    notes: list[str] = []
    too_long = False
    for path in sorted(chosen, key=len):
        parent = get_at_or_none(out, path[:-1])
        fits = isinstance(parent, dict) or (
            isinstance(parent, list) and isinstance(path[-1], int) and path[-1] < len(parent)
        )
        if not fits:  # an earlier replacement took its parent away
            continue
        raw = not id_mode and not mutations and draw(st.integers(0, 5)) == 0
        if raw:
            value: Any = HOLE
        elif id_mode:
            many = path[-1] in ("item_ids", "attachments")
            value = draw(st.lists(hostile_ids, min_size=1, max_size=3) if many else hostile_ids)
        elif mode == "free":  # often text that can be stored: the request is served
            value = draw(st.one_of(huge_texts, st.text(max_size=30), hostile_json))
        else:
            value = draw(hostile_json)
        out = set_at(out, path, value)
        if raw:
            splice = draw(st.sampled_from(RAW_VALUES))
            mutations.append(Splice(splice, value=True))
            value = f"<raw {splice[:12]!r}... {len(splice)} bytes>"
        notes.append(f"{'.'.join(map(str, path))} = {str(value)[:60]!r} ({len(str(value))})")
        texts = value if isinstance(value, list) else [value]
        too_long = too_long or (
            not raw
            and is_id_slot(kind, path)
            and all(isinstance(t, str) for t in texts)
            and any(len(t) > MAX_ID_CHARS for t in texts)
        )
    return Case(
        "fuzz_fields",
        actor or draw(actors),
        out,
        tuple(mutations),
        # An id longer than any id: a 400 before SQL (alone: with a second replacement the
        # request may no longer have that field at all).
        expect=refused() if too_long and len(chosen) == 1 else Expect(oracle=True),
        ascii_json=draw(st.booleans()),
        note="; ".join(notes),
    )


def get_at_or_none(obj: Any, path: Path) -> Any:
    try:
        return get_at(obj, path)
    except (KeyError, IndexError, TypeError):
        return None


# --- /files: every route, one part replaced ---------------------------------------------------


@dataclass(frozen=True)
class Signed:
    """A valid signed-URL query (``u``, ``e``, ``s``) for the actor's ``target``."""

    purpose: str
    target: Ref


@dataclass(frozen=True)
class FileCase:
    cls: str
    actor: str
    method: str
    route: str  # upload_direct, upload_signed, download, preview, delete
    target: Any  # a Ref or a hostile id
    signed: Signed | None
    query: tuple[tuple[str, str], ...] = ()  # replaces or adds to the signed fields
    token: str | None = "actor"  # "actor", None (no header), or a hostile header value
    content_type: str | None = None
    body: bytes = b""
    expect: frozenset[int] | None = None
    code: str | None = None
    note: str = ""

    @property
    def victim(self) -> str:
        return USERS[1] if self.actor == USERS[0] else USERS[0]


ROUTES = {
    "upload_direct": "POST",
    "upload_signed": "PUT",
    "download": "GET",
    "preview": "GET",
    "delete": "DELETE",
}
PARTS = {
    "upload_direct": ("none", "token", "content_type", "filename", "body"),
    "upload_signed": ("none", "id", "u", "e", "s", "dup", "content_type", "body"),
    "download": ("none", "id", "token"),
    "preview": ("none", "id", "u", "e", "s", "dup"),
    "delete": ("none", "id", "token"),
}


def multipart(filename: str, content: bytes, boundary: str = "b0undary") -> tuple[str, bytes]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"'
        "\r\nContent-Type: text/plain\r\n\r\n"
    )
    body = head.encode("utf-8", "surrogatepass") + content + f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


@st.composite
def file_case(draw: st.DrawFn, actor: str | None = None) -> FileCase:
    route = draw(st.sampled_from(sorted(ROUTES)))
    part = draw(st.sampled_from(PARTS[route]))
    name = draw(st.sampled_from(ATTACHMENTS))
    owner = draw(st.sampled_from(["actor", "actor", "missing"]))
    target: Any = Ref(owner, name)
    purpose = "upload" if route == "upload_signed" else "preview"
    signed = Signed(purpose, target) if route in ("upload_signed", "preview") else None
    case = FileCase("fuzz_files", actor or draw(actors), ROUTES[route], route, target, signed)
    changes: dict[str, Any] = {}
    expect: set[int] | None = None
    code: str | None = None
    value = draw(url_strings)
    if part == "id":
        changes["target"] = value
        if len(value) > MAX_ID_CHARS and "/" not in value and "%" not in value:
            expect, code = {400}, "invalid_request"
    elif part in ("u", "e", "s"):
        changes["query"] = ((part, value),)
        expect, code = {403}, "invalid_signature"
    elif part == "dup":  # a second value for a field: the last one is not the signed one
        field = draw(st.sampled_from(["u", "e", "s"]))
        changes["query"] = ((field, value), (field, "1"))
        expect, code = {403}, "invalid_signature"
    elif part == "token":
        changes["token"] = draw(st.sampled_from([None, "", "Bearer", "Basic x", "Bearer " + value]))
        expect, code = {401}, "unauthorized"
    if route in ("upload_direct", "upload_signed"):
        content = draw(st.binary(max_size=64)) if part == "body" else b"hello"
        filename = value if part == "filename" else "notes.txt"
        ctype, body = multipart(filename, content)
        if part == "content_type":
            ctype = draw(
                st.sampled_from([value, f"multipart/form-data; boundary={value}", "image/png"])
            )
        changes.update(content_type=ctype, body=body)
    if route == "upload_signed":
        changes["method"] = draw(st.sampled_from(["POST", "PUT"]))
    return replace(
        case,
        **changes,
        expect=frozenset(expect) if expect else None,
        code=code,
        note=f"{route}: {part} = {value[:60]!r} ({len(value)} characters)",
    )


def _quoted(value: str) -> str:
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


def file_request(world: World, case: FileCase) -> tuple[str, str, dict[str, bytes], bytes]:
    """(method, URL path with query, headers, body) of a file case, its placeholders resolved."""
    target = case.target
    attachment_id = world.id_for(target, case.actor) if isinstance(target, Ref) else target
    path = f"/files/{_quoted(attachment_id)}"
    if case.route == "upload_signed":
        path += "/upload"
    elif case.route == "preview":
        path += "/preview"
    elif case.route == "upload_direct":
        path = "/files"
    query: list[tuple[str, str]] = []
    if case.signed is not None:
        signed_id = world.id_for(case.signed.target, case.actor)
        signer = world.client.app.state.runtime.attachments.signer
        expires = signer.expiry()
        signature = signer.signature(case.signed.purpose, case.actor, signed_id, expires)
        fields = {"u": case.actor, "e": str(expires), "s": signature}
        replaced = {k for k, _ in case.query}
        query = [(k, v) for k, v in fields.items() if k not in replaced or len(case.query) > 1]
    query += list(case.query)
    if query:
        path += "?" + urlencode([(k, v.encode("utf-8", "surrogatepass")) for k, v in query])
    headers: dict[str, bytes] = {}
    if case.token == "actor":
        headers.update({k: v.encode() for k, v in world.client.auth(case.actor).items()})
    elif case.token is not None:
        headers["Authorization"] = header_value(case.token)
    if case.content_type is not None:
        headers["Content-Type"] = header_value(case.content_type)
    return case.method, path, headers, case.body


def header_value(text: str) -> bytes:
    """As HTTP/1.1 can carry it: UTF-8 bytes, no control characters, no space at either end
    (h11 will not send anything else)."""
    raw = text.encode("utf-8", "replace")
    return bytes(b for b in raw if b >= 0x20 and b != 0x7F).strip(b" \t")


def read_file_answer(response: httpx.Response) -> Answer:
    """Errors and JSON as every answer; a file's bytes need only the headers that keep a
    browser from running them."""
    if response.status_code >= 400 or response.headers.get("content-type", "").startswith(
        "application/json"
    ):
        return read_answer(response)
    answer = Answer(response)
    if not response.headers.get("x-request-id"):
        answer.fail("other", "no X-Request-ID header")
    if response.status_code == 200 and response.headers.get("x-content-type-options") != "nosniff":
        answer.fail("other", "a file without X-Content-Type-Options: nosniff")
    return answer


def without(rows_json: str, attachment_id: str) -> list[Any]:
    """A table's rows (from a snapshot) less those of one attachment."""
    rows = json.loads(rows_json)
    return [r for r in rows if attachment_id not in (r.get("id"), r.get("attachment_id"))]


async def run_file_example(world: World, case: FileCase) -> None:
    """Send one file case and check it as ``run_case`` checks a /chatkit one; then put the
    users' rows back as seeded."""
    log = ExampleLog()
    stats = STATS[case.cls]
    try:
        method, url, headers, body = file_request(world, case)
        texts = [unquote(url), *headers.values(), body]
        sent = "\n".join(t if isinstance(t, str) else t.decode("utf-8", "replace") for t in texts)
        log.sent.append(sent)
        before = world.current[case.actor]
        response = await world.client.http.request(method, url, headers=headers, content=body)
        answer = read_file_answer(response)
        after = world.current[case.actor] = await world.snapshot(case.actor)
        check_text(answer, world, case, sent)  # type: ignore[arg-type]
        if case.expect is not None and answer.status not in case.expect:
            answer.fail("other", f"status {answer.status}, expected {sorted(case.expect)}")
        elif (
            case.code is not None
            and isinstance(answer.json, dict)
            and answer.json.get("error", {}).get("code") != case.code
        ):
            answer.fail("other", f"error code other than {case.code!r}")
        changed = [t for t in DATA_TABLES if after[t] != before[t]]
        if case.route == "upload_signed" and isinstance(case.target, Ref):
            # A failed upload discards its pending attachment (app.files.store): nothing else.
            gone = world.id_for(case.target, case.actor)
            changed = [t for t in changed if json.loads(after[t]) != without(before[t], gone)]
        if answer.status >= 400 and changed:
            answer.fail("partial_write", f"a refused request changed {case.actor}'s {changed}")
        answer.problems += await _db_problems(world, case, before, after, log)  # type: ignore[arg-type]
        stats["cases"] += 1
        stats[f"{answer.status // 100}xx"] += 1
        for kind in {k for k, _ in answer.problems}:
            stats[kind] += 1
        if answer.problems:
            lines = [f"{case.note} as {case.actor}", f"{method} {url[:400]}"]
            lines.append(f"answer {answer.status}: {response.text[:600]}")
            lines += [f"  - [{k}] {t}" for k, t in answer.problems]
            raise AssertionError("\n".join(lines))
    finally:
        for user in USERS:
            world.current[user] = await world.snapshot(user)
            if data_of(world.current[user]) != world.data_baseline[user]:
                await world.restore(user, world.data_baseline[user])
