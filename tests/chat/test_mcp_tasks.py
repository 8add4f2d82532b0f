"""The task-manager MCP example (examples/mcp_tasks) behind the backend, over real HTTP.

Alice's tasks are hers: added and listed through /chatkit with a scripted model, invisible to
Bob, and the example refuses any call whose identity token is missing, forged, expired, for
another server or already used for another call (a resend of the same call gets the first
answer). The user's bearer token never reaches the MCP server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message, function_call
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.chat.identity import DEV_KEY_FILE, IdentitySigner, public_jwk
from app.pg.store import PostgresStore
from app.settings import Settings
from examples.mcp_tasks.store import asyncpg_dsn
from tests.harness.chatkit_client import assistant_text, done_items
from tests.harness.mcp import Stack, identity_meta, task_stack

DEADLINE = 30.0  # for waits on conditions, never a speed assertion


@pytest.fixture
async def stack(
    app_settings: Settings, database_url: str, store: PostgresStore, tmp_path: Path
) -> AsyncIterator[tuple[Stack, ScriptedModel]]:
    model = ScriptedModel([])
    settings = app_settings.model_copy(update={"data_dir": tmp_path})
    async with task_stack(settings, database_url, model) as running:
        yield running, model


def tool_outputs(call: ModelCall) -> list[Any]:
    """The JSON of every function_call_output the model was shown in this call."""
    outputs = []
    for item in call.input:
        if item.get("type") == "function_call_output":
            output = item["output"]
            if not isinstance(output, str):  # a list of content parts
                output = "".join(part.get("text", "") for part in output)
            outputs.append(json.loads(output) if output.startswith("{") else output)
    return outputs


def backend_signer(stack: Stack, **overrides: Any) -> IdentitySigner:
    """A signer holding the backend's own key (from its DATA_DIR), for crafting tokens the
    backend would never issue (expired ones)."""
    key = serialization.load_pem_private_key(
        (stack.settings.data_dir / DEV_KEY_FILE).read_bytes(), password=None
    )
    assert isinstance(key, Ed25519PrivateKey)
    return IdentitySigner(key, issuer=stack.backend_url, **overrides)


async def test_alice_adds_and_lists_tasks_bob_sees_none(
    stack: tuple[Stack, ScriptedModel],
) -> None:
    s, model = stack
    alice, bob = s.bearer("alice"), s.bearer("bob")
    model.extend(
        [
            [function_call("add_task", {"title": "Buy milk"}, call_id="call_add")],
            [assistant_message("Added: Buy milk.")],
            [function_call("list_tasks", {}, call_id="call_list_alice")],
            [assistant_message("You have one task.")],
            [function_call("list_tasks", {}, call_id="call_list_bob")],
            [assistant_message("You have no tasks.")],
        ]
    )
    thread_id, events = await s.create_thread("Remind me to buy milk", token=alice)
    assert assistant_text(done_items(events, "assistant_message")[-1]) == "Added: Buy milk."
    await s.send(thread_id, "What is on my list?", token=alice)
    await s.create_thread("What is on my list?", token=bob)
    model.assert_complete()

    (added,) = tool_outputs(model.calls[1])
    assert added["title"] == "Buy milk" and added["done"] is False
    (alice_list,) = tool_outputs(model.calls[3])[-1:]
    assert [t["title"] for t in alice_list["tasks"]] == ["Buy milk"]
    (bob_list,) = tool_outputs(model.calls[5])
    assert bob_list == {"tasks": []}

    rows = await s.rows()
    assert [(r["user_id"], r["title"], r["thread_id"]) for r in rows] == [
        ("alice", "Buy milk", thread_id)
    ]

    # Every tool call carried a token for its user, addressed to this server, from the backend.
    calls = s.recorder.tool_calls()
    assert [c["name"] for c in calls] == ["add_task", "list_tasks", "list_tasks"]
    users = []
    for call in calls:
        claims = await s.decode_identity(call["_meta"]["chatkit-pg/identity"])
        users.append((claims["sub"], claims["thread_id"] == thread_id))
    assert users == [("alice", True), ("alice", True), ("bob", False)]


def fresh_meta(stack: Stack, user: str) -> dict[str, Any]:
    """A new identity token for one call, as the backend mints for each."""
    signer = backend_signer(stack)
    return identity_meta(signer.mint(user_id=user, audience=stack.mcp_url, thread_id=None))


async def test_complete_task_only_for_its_owner(stack: tuple[Stack, ScriptedModel]) -> None:
    s, _ = stack

    class Fresh:  # meta[user]: a new token on every read, one per call
        def __getitem__(self, user: str) -> dict[str, Any]:
            return fresh_meta(s, user)

    meta = Fresh()
    added = await s.call_tool("add_task", {"title": "Water the plants"}, meta["alice"])
    assert not added.is_error
    task_id = added.structured_content["id"]  # type: ignore[index]

    by_bob = await s.call_tool("complete_task", {"task_id": task_id}, meta["bob"])
    missing = await s.call_tool("complete_task", {"task_id": task_id + 1000}, meta["bob"])
    assert by_bob.is_error and missing.is_error
    # Another user's task answers exactly like a missing one (apart from the id asked for).
    assert by_bob.content[0].text.replace(str(task_id), "N") == missing.content[0].text.replace(  # type: ignore[union-attr]
        str(task_id + 1000), "N"
    )
    assert [r["done"] for r in await s.rows()] == [False]

    done = await s.call_tool("complete_task", {"task_id": task_id}, meta["alice"])
    assert not done.is_error and done.structured_content["done"] is True  # type: ignore[index]
    listed = await s.call_tool("list_tasks", {}, meta["alice"])
    assert listed.structured_content == {"tasks": []}
    listed = await s.call_tool("list_tasks", {"include_done": True}, meta["alice"])
    assert [t["title"] for t in listed.structured_content["tasks"]] == ["Water the plants"]  # type: ignore[index]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _refusal(result: Any) -> str:
    assert result.is_error, result
    text: str = result.content[0].text
    assert "Refused: " in text
    return text


async def test_bad_identity_tokens_are_refused(stack: tuple[Stack, ScriptedModel]) -> None:
    s, _ = stack
    signer = backend_signer(s)
    now = time.time()
    real_kid = signer.kid
    forged_key = Ed25519PrivateKey.generate()

    def forged(kid: str) -> str:
        claims = {
            "iss": s.backend_url,
            "sub": "alice",
            "aud": s.mcp_url,
            "iat": int(now),
            "exp": int(now) + 300,
        }
        return jwt.encode(claims, forged_key, algorithm="EdDSA", headers={"kid": kid})

    expired = backend_signer(s, clock=lambda: now - 400).mint(
        user_id="alice", audience=s.mcp_url, thread_id=None
    )
    other_audience = signer.mint(user_id="alice", audience="http://127.0.0.1:1/mcp", thread_id=None)
    other_issuer = IdentitySigner(signer.private_key, issuer="https://evil.example").mint(
        user_id="alice", audience=s.mcp_url, thread_id=None
    )
    # Algorithm confusion: HS256 "signed" with the public key (built by hand: PyJWT refuses to).
    signing_input = ".".join(
        b64url(json.dumps(part).encode())
        for part in (
            {"alg": "HS256", "typ": "JWT", "kid": real_kid},
            {
                "iss": s.backend_url,
                "sub": "alice",
                "aud": s.mcp_url,
                "iat": int(now),
                "exp": int(now) + 60,
            },
        )
    )
    public = json.dumps(public_jwk(signer.private_key.public_key())).encode()
    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    hs256 = f"{signing_input}.{b64url(mac)}"
    cases = {
        "missing": (None, "no identity token"),
        "empty": (identity_meta(""), "no identity token"),
        "garbage": (identity_meta("not.a.jwt"), "malformed"),
        "forged with the backend's kid": (identity_meta(forged(real_kid)), "signature is invalid"),
        "forged with its own kid": (
            identity_meta(forged(public_jwk(forged_key.public_key())["kid"])),
            "unknown key",
        ),
        "expired": (identity_meta(expired), "expired"),
        "wrong audience": (identity_meta(other_audience), "another server"),
        "wrong issuer": (identity_meta(other_issuer), "another issuer"),
        "HS256 with the public key as secret": (identity_meta(hs256), "EdDSA-signed"),
        "user's own bearer token": (identity_meta(s.bearer("alice")), "EdDSA-signed"),
    }
    for name, (meta, reason) in cases.items():
        result = await s.call_tool("add_task", {"title": f"sneaky {name}"}, meta)
        assert reason in _refusal(result), name
        listed = await s.call_tool("list_tasks", {}, meta)
        assert reason in _refusal(listed), name
    assert await s.rows() == []

    # The same server accepts the backend's genuine token (the refusals were about the tokens).
    good = identity_meta(signer.mint(user_id="alice", audience=s.mcp_url, thread_id=None))
    assert not (await s.call_tool("add_task", {"title": "genuine"}, good)).is_error
    assert [r["user_id"] for r in await s.rows()] == ["alice"]


async def test_a_token_serves_one_call_and_a_replay_is_refused(
    stack: tuple[Stack, ScriptedModel],
) -> None:
    """The reproduction: a token captured from one call (here an add_task) and replayed
    within its lifetime, for a write or a read, is refused and changes nothing. The same call
    resent with it (what the backend's MCP client does when an answer is lost) gets the first
    answer, and the task is not added twice. Old code: every replay was obeyed."""
    s, _ = stack
    token = fresh_meta(s, "alice")
    first = await s.call_tool("add_task", {"title": "Pay rent"}, token)
    assert not first.is_error
    task = first.structured_content
    assert task is not None
    replays = [
        ("add_task", {"title": "Pay the thief"}),
        ("complete_task", {"task_id": task["id"]}),
        ("list_tasks", {}),
        ("list_tasks", {"include_done": True}),
        ("add_task", {"title": "Pay rent "}),  # not the same arguments
    ]
    for name, arguments in replays:
        refused = await s.call_tool(name, arguments, token)
        assert "already used for another call" in _refusal(refused), (name, arguments)

    resent = await s.call_tool("add_task", {"title": "Pay rent"}, token)
    assert not resent.is_error and resent.structured_content == task
    assert [(r["title"], r["done"]) for r in await s.rows()] == [("Pay rent", False)]
    # Each new token is a new call: nothing legitimate is refused.
    listed = await s.call_tool("list_tasks", {}, fresh_meta(s, "alice"))
    assert not listed.is_error and listed.structured_content == {"tasks": [task]}
    done = await s.call_tool("complete_task", {"task_id": task["id"]}, fresh_meta(s, "alice"))
    assert not done.is_error and done.structured_content["done"] is True  # type: ignore[index]


async def test_a_resend_during_the_first_run_gets_its_answer_and_runs_nothing(
    stack: tuple[Stack, ScriptedModel],
) -> None:
    """The backend's MCP client times out on a slow call and sends it again, with the same
    token, while the first is still running: the resend waits for that run and gets its
    answer; one task is added. The run is held on a table lock the test takes, released
    once the first insert is seen waiting and both requests have arrived."""
    s, _ = stack
    token = fresh_meta(s, "alice")
    await s.call_tool("list_tasks", {}, fresh_meta(s, "alice"))  # the schema exists
    # One connection holds the lock; the other watches (pg_stat_activity is a snapshot that
    # stays the same for the rest of a transaction).
    conn = await asyncpg.connect(asyncpg_dsn(s.database_url))
    watch = await asyncpg.connect(asyncpg_dsn(s.database_url))
    try:
        lock = conn.transaction()
        await lock.start()
        await conn.execute("LOCK TABLE mcp_tasks.tasks IN SHARE MODE")
        first = asyncio.create_task(s.call_tool("add_task", {"title": "Slow"}, token))
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE 'INSERT INTO mcp_tasks.tasks%'"
        )
        async with asyncio.timeout(DEADLINE):
            while await watch.fetchval(waiting) != 1:
                await asyncio.sleep(0.01)
            resent = asyncio.create_task(s.call_tool("add_task", {"title": "Slow"}, token))
            while len(s.recorder.tool_calls()) < 3:
                await asyncio.sleep(0.01)
        await lock.rollback()
        answers = await asyncio.wait_for(asyncio.gather(first, resent), DEADLINE)
    finally:
        await watch.close()
        await conn.close()
    assert not answers[0].is_error
    assert answers[1].structured_content == answers[0].structured_content
    assert [r["title"] for r in await s.rows()] == ["Slow"]


async def test_the_backends_own_resend_is_answered_not_refused(
    app_settings: Settings, database_url: str, store: PostgresStore, tmp_path: Path
) -> None:
    """End to end: the backend's MCP client gives up on a slow add_task (MCP_TIMEOUT_SECONDS)
    and sends it again with the same ``_meta`` (the Agents SDK's retry; it also cancels the
    first sending, which the server would otherwise stop). The example must not refuse that
    legitimate resend, nor add the task twice: the model gets the task, and there is one row.
    A guard refusing every second use of a token fails this test (checked)."""
    model = ScriptedModel(
        [
            [function_call("add_task", {"title": "Slow"}, call_id="call_slow")],
            [assistant_message("Added.")],
        ]
    )
    settings = app_settings.model_copy(update={"data_dir": tmp_path, "mcp_timeout_seconds": 3.0})
    async with task_stack(settings, database_url, model) as s:
        conn = await asyncpg.connect(asyncpg_dsn(s.database_url))
        try:
            lock = conn.transaction()
            await lock.start()
            await conn.execute("LOCK TABLE mcp_tasks.tasks IN SHARE MODE")
            reply = asyncio.create_task(s.create_thread("Add: slow", token=s.bearer("alice")))
            async with asyncio.timeout(DEADLINE):  # the first sending timed out; a resend came
                while len(s.recorder.tool_calls()) < 2:
                    await asyncio.sleep(0.01)
            await lock.rollback()
            await asyncio.wait_for(reply, DEADLINE)
        finally:
            await conn.close()
        model.assert_complete()
        sendings = s.recorder.tool_calls()
        tokens = {call["_meta"]["chatkit-pg/identity"] for call in sendings}
        assert len(sendings) >= 2 and len(tokens) == 1, "a resend, with the same token"
        (added,) = tool_outputs(model.calls[1])
        assert isinstance(added, dict) and added["title"] == "Slow", added
        assert [r["title"] for r in await s.rows()] == ["Slow"]


async def test_bearer_token_never_reaches_the_mcp_server(
    stack: tuple[Stack, ScriptedModel],
) -> None:
    s, model = stack
    token = s.bearer("alice")
    model.extend(
        [
            [function_call("add_task", {"title": "Call mum"}, call_id="call_1")],
            [assistant_message("Done.")],
        ]
    )
    await s.create_thread("Add: call mum", token=token)
    model.assert_complete()
    received = s.recorder.everything()
    assert s.recorder.tool_calls(), "the tool was called"
    assert token not in received
    assert token.split(".")[2] not in received  # not even its signature
    for request in s.recorder.requests:
        assert "authorization" not in {name.lower() for name, _ in request.headers}
    # The only JWTs the server saw are the backend's EdDSA identity tokens.
    jwts = re.findall(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+", received)
    assert jwts and {jwt.get_unverified_header(t)["alg"] for t in jwts} == {"EdDSA"}


async def test_concurrent_users_each_get_their_own_identity(
    stack: tuple[Stack, ScriptedModel],
) -> None:
    """One MCP session serves every user: identity is decided per call, never shared."""
    s, model = stack

    def respond(call: ModelCall) -> Any:
        last = call.input[-1]
        if last.get("type") == "function_call_output":
            return [assistant_message("Added.")]
        text = last["content"] if isinstance(last["content"], str) else last["content"][0]["text"]
        title = text.removeprefix("add ")
        return [function_call("add_task", {"title": title}, call_id=f"call_{title}")]

    users = ["alice", "bob", "carol"]
    per_user = 3
    model.extend([ModelStep.respond(respond) for _ in range(2 * len(users) * per_user)])
    await asyncio.gather(
        *(
            s.create_thread(f"add {user}-{n}", token=s.bearer(user))
            for n in range(per_user)
            for user in users
        )
    )
    model.assert_complete()
    rows = await s.rows()
    assert len(rows) == len(users) * per_user
    for row in rows:
        assert row["title"].split("-")[0] == row["user_id"], row
    for call in s.recorder.tool_calls():
        claims = await s.decode_identity(call["_meta"]["chatkit-pg/identity"])
        assert call["arguments"]["title"].split("-")[0] == claims["sub"]
