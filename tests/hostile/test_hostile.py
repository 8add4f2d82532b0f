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
failed, by kind; a shrinking failure counts each replay). Any loss fails the case that
lost it; tests/hostile/conftest.py prints the counts as the Reliability table (docs/reliability.md)
at the end of the session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from sqlalchemy.ext.asyncio import AsyncEngine

from app.pg.pool import ConnectionPool
from app.settings import Settings
from tests.harness.hostile_cases import (
    R,
    bad_cursor_case,
    bad_limit_case,
    deep_case,
    extra_fields_case,
    foreign_case,
    huge_case,
    invalid_utf8_case,
    limit_outcome,
    malformed_json_case,
    missing_params_case,
    nested,
    non_object_case,
    sequences,
    unknown_ids_case,
    unknown_type_case,
    unstorable_case,
    well_formed_case,
    wrong_type_case,
)
from tests.harness.hostile_fuzz import hostile
from tests.harness.hostile_world import (
    ALICE_ID,
    BOB_ID,
    BODY_LIMIT,
    CLASSES,
    HOLE,
    NOT_FOUND,
    NOT_JSON,
    Case,
    Expect,
    PadTo,
    Raw,
    Ref,
    Splice,
    Swap,
    Tpl,
    World,
    expect_status,
    refused,
    run_example,
    seeded_world,
)


@pytest.fixture(scope="module")
async def world(
    test_settings: Settings, engine: AsyncEngine, pool: ConnectionPool
) -> AsyncIterator[World]:
    async with seeded_world(test_settings, engine, pool) as seeded:
        yield seeded


# --- the properties ------------------------------------------------------------------------


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
            X(req("threads.create", input=msg("files", R("attachment"))), OK),
            X(
                req("threads.add_user_message", thread_id=T1, input=msg("again", R("image"))),
                OK,
            ),
            X(
                req("threads.create", input=msg("files", R("attachment"), R("image"))),
                expect_status(409, "attachment_in_use"),
                "the image belongs to T1",
            ),
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
            X(req("threads.list", after="x" * 5000), refused(), "longer than any id"),
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


# --- every input class is exercised ---------------------------------------------------------


def test_every_input_class_has_explicit_cases() -> None:
    """Each class has hand-picked cases, so ``test_explicit_cases`` exercises it in any order or
    selection (the Reliability table is a report printed at the end of the session by
    tests/hostile/conftest.py, not a test that must run last)."""
    assert set(EXPLICIT) == set(CLASSES)
    empty = [cls for cls in CLASSES if not EXPLICIT[cls]]
    assert not empty, f"no explicit cases for {empty}"
