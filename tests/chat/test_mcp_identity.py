"""The backend's side of MCP identity (app/chat/identity.py): keys, JWKS, tokens, configuration.

End-to-end behaviour through an MCP server is in test_mcp_tasks.py."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import pytest
from agents.mcp import MCPToolMetaContext
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.chat.agent import identity_meta_resolver
from app.chat.identity import (
    DEV_KEY_FILE,
    IDENTITY_META_KEY,
    IdentitySigner,
    dev_key_file,
    load_identity,
    public_jwk,
)
from app.errors import ConfigurationError
from app.settings import PROJECT_ROOT, Settings
from examples.mcp_tasks.identity import Identity, IdentityError, IdentityVerifier, ReplayGuard
from tests.conftest import MakeClient
from tests.harness.loopback import serve


def write_key(path: Path, key: Ed25519PrivateKey | Any) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def write_public(path: Path, key: Ed25519PrivateKey) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


async def test_jwks_is_public_and_holds_only_public_keys(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.http.get("/.well-known/jwks.json")  # no Authorization header
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert "max-age" in response.headers["cache-control"]
    (key,) = response.json()["keys"]
    assert key["kty"] == "OKP" and key["crv"] == "Ed25519" and key["alg"] == "EdDSA"
    assert "d" not in key  # never the private part
    # The published key is the one in DATA_DIR, under its RFC 7638 thumbprint.
    private = serialization.load_pem_private_key(
        (client.settings.data_dir / DEV_KEY_FILE).read_bytes(), password=None
    )
    assert isinstance(private, Ed25519PrivateKey)
    assert key == public_jwk(private.public_key())


def test_kid_is_the_rfc_8037_thumbprint() -> None:
    # RFC 8037 appendix A.3: the thumbprint of its Ed25519 example key.
    raw = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    jwk = public_jwk(Ed25519PublicKey.from_public_bytes(raw))
    assert jwk["x"] == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert jwk["kid"] == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_dev_key_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir)
    first = load_identity(settings)
    assert first is not None
    path = data_dir / DEV_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_bytes()
    second = load_identity(settings)
    assert second is not None and second.kid == first.kid
    assert path.read_bytes() == content
    assert [p.name for p in data_dir.iterdir()] == [DEV_KEY_FILE]  # no temporary left


def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: dev_key_file(tmp_path).read_bytes(), range(32)))
    assert len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [DEV_KEY_FILE]


def test_configured_key_and_previous_key(tmp_path: Path) -> None:
    current, previous = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    settings = Settings(
        data_dir=tmp_path / "data",
        identity_signing_key_file=write_key(tmp_path / "current.pem", current),
        identity_previous_public_key_file=write_public(tmp_path / "previous.pub", previous),
        public_base_url="https://chat.example.com/",
        identity_ttl_seconds=120,
    )
    signer = load_identity(settings)
    assert signer is not None
    assert not (tmp_path / "data").exists()  # nothing generated when a key is configured
    assert signer.jwks()["keys"] == [
        public_jwk(current.public_key()),
        public_jwk(previous.public_key()),
    ]
    token = signer.mint(user_id="alice", audience="http://tools:8001/mcp", thread_id="thr_1")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": signer.kid, "typ": "JWT"}
    claims = jwt.decode(
        token, current.public_key(), algorithms=["EdDSA"], audience="http://tools:8001/mcp"
    )
    assert claims["iss"] == "https://chat.example.com"
    assert claims["sub"] == "alice" and claims["thread_id"] == "thr_1"
    assert claims["exp"] - claims["iat"] == 120
    assert abs(claims["iat"] - time.time()) < 5


@pytest.mark.parametrize("ttl", [0, 301, 3600])
def test_token_lifetime_is_bounded(ttl: int) -> None:
    with pytest.raises(ValidationError, match="identity_ttl_seconds"):
        Settings(identity_ttl_seconds=ttl)


def test_bad_key_files_are_one_line_naming_the_setting(tmp_path: Path) -> None:
    rsa = generate_private_key(public_exponent=65537, key_size=2048)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    cases = {
        "missing": (tmp_path / "nope.pem", "cannot read IDENTITY_SIGNING_KEY_FILE"),
        "garbage": (garbage, "IDENTITY_SIGNING_KEY_FILE"),
        "rsa": (write_key(tmp_path / "rsa.pem", rsa), "must be an Ed25519 key"),
    }
    for name, (path, message) in cases.items():
        with pytest.raises(ConfigurationError, match=message) as caught:
            load_identity(Settings(data_dir=tmp_path, identity_signing_key_file=path))
        assert "\n" not in str(caught.value), name
    good = write_key(tmp_path / "good.pem", Ed25519PrivateKey.generate())
    with pytest.raises(ConfigurationError, match="IDENTITY_PREVIOUS_PUBLIC_KEY_FILE"):
        load_identity(
            Settings(identity_signing_key_file=good, identity_previous_public_key_file=garbage)
        )


def test_production_needs_a_key_only_when_tokens_are_signed(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="IDENTITY_SIGNING_KEY_FILE"):
        load_identity(
            Settings(data_dir=tmp_path, production=True, mcp_server_urls=["http://t/mcp"])
        )
    # Production without MCP servers signs nothing: no key needed, an empty JWKS.
    assert load_identity(Settings(data_dir=tmp_path, production=True)) is None
    assert list(tmp_path.iterdir()) == []  # never a generated key in production


def test_serve_refuses_production_without_a_key_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "PRODUCTION"))}
    env |= {
        "DATA_DIR": str(tmp_path),
        "PRODUCTION": "true",
        "JWT_SECRET": "x" * 64,
        "MCP_SERVER_URLS": "http://127.0.0.1:1/mcp",
    }
    env.pop("IDENTITY_SIGNING_KEY_FILE", None)
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert (
        lines[0].startswith("chatkit-pg cannot start: ") and "IDENTITY_SIGNING_KEY_FILE" in lines[0]
    )
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # refused before the database or any key file


def test_resolver_mints_per_call_from_the_run_context(tmp_path: Path) -> None:
    signer = load_identity(Settings(data_dir=tmp_path, public_base_url="https://chat.test"))
    assert signer is not None
    resolve = identity_meta_resolver(signer, "http://tools/mcp")
    from chatkit.agents import AgentContext

    from app.context import RequestContext

    def run_context(user: str, thread: str) -> Any:
        context = AgentContext[RequestContext].model_construct(
            thread=SimpleNamespace(id=thread), request_context=RequestContext(user_id=user)
        )
        return SimpleNamespace(context=context)

    metas = [
        resolve(MCPToolMetaContext(run_context(user, thread), "mcp0", "add_task", {}))
        for user, thread in (("alice", "thr_a"), ("bob", "thr_b"), ("alice", "thr_c"))
    ]
    claims = [
        jwt.decode(
            meta[IDENTITY_META_KEY],
            signer.private_key.public_key(),
            algorithms=["EdDSA"],
            audience="http://tools/mcp",
        )
        for meta in metas
    ]
    assert [(c["sub"], c["thread_id"]) for c in claims] == [
        ("alice", "thr_a"),
        ("bob", "thr_b"),
        ("alice", "thr_c"),
    ]
    assert len({c["jti"] for c in claims}) == 3
    assert set(metas[0]) == {IDENTITY_META_KEY}  # nothing else goes out
    with pytest.raises(RuntimeError):
        resolve(MCPToolMetaContext(SimpleNamespace(context=None), "mcp0", "add_task", {}))  # type: ignore[arg-type]


async def test_example_verifier_follows_a_key_rotation() -> None:
    """Tokens from the previous key keep verifying while it is published; a new kid makes the
    verifier refetch (at most once per min_refetch_seconds)."""
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    published: list[dict[str, Any]] = [public_jwk(old.public_key())]
    fetches = 0

    async def jwks(request: Any) -> JSONResponse:
        nonlocal fetches
        fetches += 1
        return JSONResponse({"keys": published})

    async with serve(Starlette(routes=[Route("/jwks", jwks)])) as base:
        verifier = IdentityVerifier(
            f"{base}/jwks",
            issuer="https://chat.test",
            audience="http://t/mcp",
            min_refetch_seconds=0,
        )
        old_signer = IdentitySigner(old, issuer="https://chat.test")
        new_signer = IdentitySigner(
            new, issuer="https://chat.test", previous_public_key=old.public_key()
        )
        try:
            token = old_signer.mint(user_id="alice", audience="http://t/mcp", thread_id=None)
            assert (await verifier.verify(token)).user_id == "alice"
            assert (await verifier.verify(token)).user_id == "alice"
            assert fetches == 1  # cached
            published[:] = new_signer.jwks()["keys"]  # the backend rotated
            token = new_signer.mint(user_id="bob", audience="http://t/mcp", thread_id="thr")
            identity = await verifier.verify(token)
            assert (identity.user_id, identity.thread_id) == ("bob", "thr")
            assert fetches == 2
            old_token = old_signer.mint(user_id="alice", audience="http://t/mcp", thread_id=None)
            assert (await verifier.verify(old_token)).user_id == "alice"
            published[:] = new_signer.jwks()["keys"][:1]  # rotation finished
            verifier.min_refetch_seconds = 3600
            forged = IdentitySigner(Ed25519PrivateKey.generate(), issuer="https://chat.test")
            for _ in range(3):
                with pytest.raises(IdentityError, match="unknown key"):
                    await verifier.verify(
                        forged.mint(user_id="alice", audience="http://t/mcp", thread_id=None)
                    )
            assert fetches == 2  # unknown kids cannot make it hammer the backend
        finally:
            await verifier.aclose()


async def test_example_replay_guard_is_bounded_and_remembers_until_expiry() -> None:
    """The example's record of used tokens (examples/mcp_tasks ReplayGuard): a token id is
    remembered until its token expires, never more than ``max_tokens`` at once; a resend's
    answer is kept ``resend_seconds`` only, then the token is just "used"."""
    now = [1_000.0]
    guard = ReplayGuard(max_tokens=3, resend_seconds=0, leeway_seconds=5, clock=lambda: now[0])
    runs: list[str] = []

    def token(jti: str, expires_at: float) -> Identity:
        return Identity("alice", None, jti, expires_at)

    async def run(name: str) -> str:
        async def action() -> str:
            runs.append(name)
            return name

        return await guard.run_once(token(name, 1_300.0), "list_tasks", {}, action)

    for name in ("t1", "t2", "t3"):
        assert await run(name) == name
    assert len(guard) == 3
    await asyncio.sleep(0.01)  # past resend_seconds (0): the answers are no longer kept
    with pytest.raises(IdentityError, match=r"already used$"):
        await run("t1")  # the same call, once its answer is gone
    with pytest.raises(IdentityError, match="another call"):
        await guard.run_once(token("t2", 1_300.0), "add_task", {"title": "x"}, lambda: run("x"))
    assert runs == ["t1", "t2", "t3"]

    assert await run("t4") == "t4"  # full of live tokens: the oldest (t1) is forgotten
    assert len(guard) == 3
    now[0] = 1_306.0  # every token so far has expired (exp + leeway)
    assert await run("t5") == "t5"
    assert len(guard) == 1


async def test_jwks_is_served_over_real_http(make_client: MakeClient) -> None:
    client = await make_client()
    async with serve(client.app, lifespan="off") as base, httpx.AsyncClient() as http:
        response = await http.get(f"{base}/.well-known/jwks.json")
    assert response.status_code == 200 and len(response.json()["keys"]) == 1


async def test_jwks_serves_the_previous_key_during_a_rotation(
    make_client: MakeClient, tmp_path: Path
) -> None:
    current, previous = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    client = await make_client(
        identity_signing_key_file=write_key(tmp_path / "current.pem", current),
        identity_previous_public_key_file=write_public(tmp_path / "previous.pub", previous),
    )
    response = await client.http.get("/.well-known/jwks.json")
    assert response.json()["keys"] == [
        public_jwk(current.public_key()),
        public_jwk(previous.public_key()),
    ]
