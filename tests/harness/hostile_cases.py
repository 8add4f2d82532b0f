"""The hostile-input suite's Hypothesis strategies, one per input class (tests/hostile/test_hostile.py
explains the suite; tests/harness/hostile_world.py holds what the cases are made of)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from hypothesis import strategies as st

from app.ids import MAX_ID_CHARS
from app.pg.store import MAX_PAGE_SIZE
from tests.harness.hostile_world import (
    ANY,
    ATTACHMENTS,
    BODY_LIMIT,
    CLASSES,
    HOLE,
    IMAGE_IN,
    NAMES,
    NOT_FOUND,
    NOT_JSON,
    THREAD_ITEMS,
    THREADS,
    USER_MESSAGE,
    USERS,
    Affix,
    Case,
    Expect,
    Mutation,
    PadTo,
    Path,
    Raw,
    Ref,
    Splice,
    Swap,
    Tpl,
    Truncate,
    del_at,
    expect_status,
    get_at,
    refused,
    rename_key,
    set_at,
    walk,
)

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
        "limit": st.none() | st.integers(1, 50),
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
    if kind in ("threads.create", "threads.add_user_message") and (
        R("image") in params["input"]["attachments"] and params.get("thread_id") != R(IMAGE_IN)
    ):
        # an attachment belongs to the thread it was sent in: elsewhere it is refused
        status, code = 409, "attachment_in_use"
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
    """Status and page bound for a ``limit`` (app.http.endpoint): absent or null is the default
    page (20); a JSON integer from 1 to 500 is a page of at most that many; anything else
    (0, negatives, more than 500, ``true``, ``"10"``, ``3.0``) is a 400."""
    if limit is None:
        return 200, 20
    if type(limit) is int and 1 <= limit <= MAX_PAGE_SIZE:
        return 200, limit
    return 400, None


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
    elif kind == "long":  # a well-formed id up to the bound (404), a 400 beyond it
        after = draw(st.text(safe_chars, min_size=MAX_ID_CHARS - 8, max_size=3000))
        if len(after) > MAX_ID_CHARS:
            expect = refused()
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
