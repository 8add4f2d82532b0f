"""JWT authentication: shared secret, JWKS over real loopback HTTP, dev mode and the CLI."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.errors import AuthenticationError, ConfigurationError, ServiceUnavailableError
from app.http.auth import (
    DEV_SECRET_FILE,
    TokenVerifier,
    check_auth_settings,
    dev_secret,
    mint_token,
)
from app.main import create_app
from app.settings import PROJECT_ROOT, Settings
from tests.conftest import MakeClient
from tests.harness.loopback import serve

SECRET = "a-shared-secret-long-enough-for-hs256-and-hs512-" + "x" * 20
ISSUER = "https://auth.example.com"
AUDIENCE = "chatkit-pg"


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "iat": now, "exp": now + 300}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def unsigned(payload: dict[str, Any]) -> str:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(payload)}."


def hs256_by_hand(payload: dict[str, Any], key: bytes, headers: dict[str, Any]) -> str:
    """HS256 signed with any bytes (PyJWT refuses to use a public key as an HMAC secret)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = {"alg": "HS256", "typ": "JWT", **headers}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def settings_for(base: Settings, **over: Any) -> Settings:
    return base.model_copy(update={"jwt_secret": None, **over})


async def rejected(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthenticationError) as info:
        await verifier.verify(token)
    assert info.value.status_code == 401
    return info.value.message


# --- shared secret --------------------------------------------------------------------------


async def test_hs256(test_settings: Settings) -> None:
    settings = settings_for(test_settings, jwt_secret=SecretStr(SECRET))
    verifier = TokenVerifier.from_settings(settings)
    assert verifier.mode == "secret"
    assert await verifier.verify(jwt.encode(claims(), SECRET, algorithm="HS256")) == "alice"
    # Small clock skew is tolerated (30 s by default).
    skewed = claims(exp=int(time.time()) - 10)
    assert await verifier.verify(jwt.encode(skewed, SECRET, algorithm="HS256")) == "alice"

    bad = {
        "wrong secret": jwt.encode(claims(), SECRET + "x", algorithm="HS256"),
        "alg none": unsigned(claims()),
        "HS512 not allowed": jwt.encode(claims(), SECRET, algorithm="HS512"),
        "expired": jwt.encode(claims(exp=int(time.time()) - 120), SECRET, algorithm="HS256"),
        "no exp": jwt.encode(claims(exp=None), SECRET, algorithm="HS256"),
        "not yet valid": jwt.encode(claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256"),
        "missing sub": jwt.encode(claims(sub=None), SECRET, algorithm="HS256"),
        "empty sub": jwt.encode(claims(sub=" "), SECRET, algorithm="HS256"),
        "numeric sub": jwt.encode(claims(sub=42), SECRET, algorithm="HS256"),
        "NUL in sub": jwt.encode(claims(sub="al\x00ice"), SECRET, algorithm="HS256"),
        "unexpected aud": jwt.encode(claims(aud="someone-else"), SECRET, algorithm="HS256"),
        "garbage": "not-a-jwt",
        "three garbage parts": "abc.def.ghi",
        "tampered": jwt.encode(claims(), SECRET, algorithm="HS256")[:-2] + "xx",
    }
    for name, token in bad.items():
        message = await rejected(verifier, token)
        assert "alice" not in message, name
    assert "expired" in await rejected(verifier, bad["expired"])


async def test_verified_tokens_are_cached_never_past_expiry(test_settings: Settings) -> None:
    verifier = TokenVerifier.from_settings(
        settings_for(test_settings, jwt_secret=SecretStr(SECRET))
    )
    # Valid for about one more second (30 s leeway): cached for no longer than that.
    short = jwt.encode(claims(exp=int(time.time()) - 29), SECRET, algorithm="HS256")
    assert await verifier.verify(short) == "alice"
    assert verifier._verified[short][1] - time.monotonic() <= 1.5
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert await verifier.verify(token) == "alice"
    assert 59 <= verifier._verified[token][1] - time.monotonic() <= 60
    # A remembered token is not checked again; any other token still is.
    verifier._secret = b"a different secret from now on, long enough for HS256 use"
    assert await verifier.verify(token) == "alice"
    await rejected(verifier, jwt.encode(claims(sub="bob"), SECRET, algorithm="HS256"))


async def test_issuer_audience_and_custom_claim(test_settings: Settings) -> None:
    settings = settings_for(
        test_settings,
        jwt_secret=SecretStr(SECRET),
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        jwt_user_claim="uid",
    )
    verifier = TokenVerifier.from_settings(settings)
    good = claims(iss=ISSUER, aud=AUDIENCE, uid="user-7")
    assert await verifier.verify(jwt.encode(good, SECRET, algorithm="HS256")) == "user-7"
    for wrong in (
        {"iss": ISSUER + "/evil"},
        {"iss": None},
        {"aud": "other"},
        {"aud": None},
        {"uid": None},
    ):
        payload = {k: v for k, v in (good | wrong).items() if v is not None}
        await rejected(verifier, jwt.encode(payload, SECRET, algorithm="HS256"))


async def test_authorization_header_forms(test_settings: Settings) -> None:
    verifier = TokenVerifier.from_settings(
        settings_for(test_settings, jwt_secret=SecretStr(SECRET))
    )
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert await verifier.authenticate(f"Bearer {token}") == "alice"
    assert await verifier.authenticate(f"bearer   {token}") == "alice"
    for header in (None, "", "Basic YWxpY2U6cHc=", "Bearer", "Bearer ", token, "Bearer a b c"):
        with pytest.raises(AuthenticationError):
            await verifier.authenticate(header)


# --- JWKS -----------------------------------------------------------------------------------


@dataclass
class Issuer:
    """An identity provider on loopback serving its JWKS; counts the fetches."""

    keys: dict[str, Any] = field(default_factory=dict)  # kid -> private key
    published: list[dict[str, Any]] = field(default_factory=list)
    fetches: int = 0
    url: str = ""

    def add(self, kid: str, private: Any, alg: str) -> None:
        public = private.public_key()
        if alg == "EdDSA":
            jwk = json.loads(OKPAlgorithm.to_jwk(public))
        elif alg == "RS256":
            jwk = json.loads(RSAAlgorithm.to_jwk(public))
        else:
            jwk = json.loads(ECAlgorithm.to_jwk(public))
        self.keys[kid] = private
        self.published.append(jwk | {"kid": kid, "alg": alg, "use": "sig"})

    def token(self, kid: str, alg: str, **over: Any) -> str:
        payload = claims(iss=ISSUER, aud=AUDIENCE) | over
        return jwt.encode(payload, self.keys[kid], algorithm=alg, headers={"kid": kid})

    async def jwks(self, request: Request) -> JSONResponse:
        self.fetches += 1
        return JSONResponse({"keys": self.published})


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    idp = Issuer()
    idp.add("ed-1", ed25519.Ed25519PrivateKey.generate(), "EdDSA")
    idp.add("rsa-1", rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")
    idp.add("ec-1", ec.generate_private_key(ec.SECP256R1()), "ES256")
    app = Starlette(routes=[Route("/.well-known/jwks.json", idp.jwks)])
    async with serve(app, lifespan="off") as base:
        idp.url = f"{base}/.well-known/jwks.json"
        yield idp


def jwks_settings(base: Settings, issuer: Issuer, **over: Any) -> Settings:
    return settings_for(
        base, jwt_jwks_url=issuer.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE, **over
    )


async def test_jwks_eddsa_rs256_es256(test_settings: Settings, issuer: Issuer) -> None:
    verifier = TokenVerifier.from_settings(jwks_settings(test_settings, issuer))
    try:
        assert verifier.mode == "jwks"
        assert await verifier.verify(issuer.token("ed-1", "EdDSA")) == "alice"
        assert await verifier.verify(issuer.token("rsa-1", "RS256", sub="bob")) == "bob"
        assert await verifier.verify(issuer.token("ec-1", "ES256", sub="carol")) == "carol"
        assert issuer.fetches == 1  # cached

        rsa_public_pem = (
            issuer.keys["rsa-1"]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        hs_with_public_key = hs256_by_hand(
            claims(iss=ISSUER, aud=AUDIENCE), rsa_public_pem, {"kid": "rsa-1"}
        )
        other_ed = ed25519.Ed25519PrivateKey.generate()
        forged_ed = jwt.encode(
            claims(iss=ISSUER, aud=AUDIENCE), other_ed, algorithm="EdDSA", headers={"kid": "ed-1"}
        )
        wrong_family = jwt.encode(
            claims(iss=ISSUER, aud=AUDIENCE),
            issuer.keys["rsa-1"],
            algorithm="RS256",
            headers={"kid": "ed-1"},
        )
        for name, token in {
            "alg none": unsigned(claims(iss=ISSUER, aud=AUDIENCE)),
            "HS256 signed with the RSA public key": hs_with_public_key,
            "signed by a stranger": forged_ed,
            "RS256 claiming an Ed25519 kid": wrong_family,
            "expired": issuer.token("ed-1", "EdDSA", exp=int(time.time()) - 600),
            "wrong iss": issuer.token("ed-1", "EdDSA", iss="https://evil.example"),
            "wrong aud": issuer.token("rsa-1", "RS256", aud="another-app"),
            "missing sub": issuer.token("ec-1", "ES256", sub=None),
        }.items():
            message = await rejected(verifier, token)
            assert message, name
    finally:
        await verifier.aclose()


async def test_unknown_kid_refetches_at_most_once_per_window(
    test_settings: Settings, issuer: Issuer
) -> None:
    verifier = TokenVerifier.from_settings(jwks_settings(test_settings, issuer))
    try:
        assert await verifier.verify(issuer.token("ed-1", "EdDSA")) == "alice"
        assert issuer.fetches == 1
        issuer.add("ed-2", ed25519.Ed25519PrivateKey.generate(), "EdDSA")
        # Within 30 s of the last fetch an unknown kid does not reach the issuer...
        await rejected(verifier, issuer.token("ed-2", "EdDSA"))
        for n in range(5):
            forged = jwt.encode(
                claims(),
                ed25519.Ed25519PrivateKey.generate(),
                algorithm="EdDSA",
                headers={"kid": f"random-{n}"},
            )
            await rejected(verifier, forged)
        assert issuer.fetches == 1
    finally:
        await verifier.aclose()

    # With the window elapsed (0 s here) an unknown kid triggers one refetch: rotation works.
    verifier = TokenVerifier.from_settings(
        jwks_settings(test_settings, issuer, jwt_jwks_min_refetch_seconds=0.0)
    )
    try:
        assert await verifier.verify(issuer.token("ed-1", "EdDSA")) == "alice"
        issuer.add("ed-3", ed25519.Ed25519PrivateKey.generate(), "EdDSA")
        before = issuer.fetches
        assert await verifier.verify(issuer.token("ed-3", "EdDSA", sub="rotated")) == "rotated"
        assert issuer.fetches == before + 1
    finally:
        await verifier.aclose()


async def test_unreachable_jwks_is_503_not_401(test_settings: Settings) -> None:
    settings = settings_for(test_settings, jwt_jwks_url="http://127.0.0.1:1/jwks.json")
    verifier = TokenVerifier.from_settings(settings)
    try:
        token = jwt.encode(
            claims(), ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": "k"}
        )
        with pytest.raises(ServiceUnavailableError):
            await verifier.verify(token)
    finally:
        await verifier.aclose()


async def test_jwks_tokens_over_http(make_client: MakeClient, issuer: Issuer) -> None:
    client = await make_client(
        jwt_secret=None, jwt_jwks_url=issuer.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE
    )
    ok = await client.post(
        {"type": "threads.list", "params": {}},
        user=None,
        headers={"Authorization": f"Bearer {issuer.token('rsa-1', 'RS256')}"},
    )
    assert ok.status_code == 200, ok.text
    for header in (
        {},
        {"Authorization": "Bearer garbage"},
        {"Authorization": f"Bearer {unsigned(claims(iss=ISSUER, aud=AUDIENCE))}"},
        {"Authorization": "Basic YWxpY2U6cHc="},
    ):
        response = await client.post(
            {"type": "threads.list", "params": {}}, user=None, headers=header
        )
        assert response.status_code == 401, header
        assert response.json()["error"]["code"] == "unauthorized"
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="chatkit"')
        if header.get("Authorization", "").startswith("Bearer"):
            assert 'error="invalid_token"' in challenge


# --- configuration, dev mode, CLI -----------------------------------------------------------


def test_configuration_is_checked(test_settings: Settings) -> None:
    base = settings_for(test_settings)
    for over, fragment in (
        ({"jwt_secret": SecretStr(SECRET), "jwt_jwks_url": "https://x/jwks"}, "not both"),
        ({"jwt_secret": SecretStr(SECRET), "jwt_algorithms": ["none"]}, "'none'"),
        ({"jwt_secret": SecretStr(SECRET), "jwt_algorithms": ["RS256"]}, "needs JWT_JWKS_URL"),
        ({"jwt_jwks_url": "https://x/jwks", "jwt_algorithms": ["HS256"]}, "cannot be used"),
        ({"production": True}, "no JWT configuration"),
        ({"production": True, "jwt_secret": SecretStr("short")}, "at least 32 bytes"),
        ({"production": True, "jwt_jwks_url": "http://idp.example/jwks"}, "https"),
    ):
        with pytest.raises(ConfigurationError) as info:
            check_auth_settings(base.model_copy(update=over))
        assert fragment in str(info.value), over
    check_auth_settings(
        base.model_copy(update={"production": True, "jwt_secret": SecretStr(SECRET)})
    )
    check_auth_settings(
        base.model_copy(update={"production": True, "jwt_jwks_url": "http://127.0.0.1:9/jwks"})
    )


def test_production_refuses_to_start_without_jwt(test_settings: Settings) -> None:
    with pytest.raises(ConfigurationError, match="PRODUCTION is set but no JWT configuration"):
        create_app(settings_for(test_settings, production=True))


async def test_dev_mode_secret_lives_in_the_data_dir(
    tmp_path: Path, test_settings: Settings
) -> None:
    settings = settings_for(test_settings, data_dir=tmp_path / "data")
    verifier = TokenVerifier.from_settings(settings)
    assert verifier.mode == "dev"
    path = tmp_path / "data" / DEV_SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_text()
    assert len(secret) >= 48 and dev_secret(tmp_path / "data") == secret  # created once
    token = mint_token(settings, "alice")
    assert await verifier.verify(token) == "alice"
    # A token signed with another dev secret is refused.
    other = settings_for(test_settings, data_dir=tmp_path / "elsewhere")
    await rejected(verifier, mint_token(other, "alice"))


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "PRODUCTION"))}
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=PROJECT_ROOT,
        env=full_env | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_token_command_prints_only_a_token(tmp_path: Path, test_settings: Settings) -> None:
    result = _cli(["token", "--sub", "alice"], {"DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n" and token.count(".") == 2
    verifier = TokenVerifier.from_settings(settings_for(test_settings, data_dir=tmp_path))
    assert await verifier.verify(token) == "alice"

    jwks = _cli(
        ["token", "--sub", "alice"], {"DATA_DIR": str(tmp_path), "JWT_JWKS_URL": "https://idp/jwks"}
    )
    assert jwks.returncode == 2 and jwks.stdout == ""
    assert "identity provider" in jwks.stderr


def test_serve_refuses_production_without_jwt(tmp_path: Path) -> None:
    result = _cli(["serve"], {"DATA_DIR": str(tmp_path), "PRODUCTION": "true"})
    assert result.returncode == 2
    assert "PRODUCTION is set but no JWT configuration" in result.stderr
    assert not (tmp_path / "postgres").exists()  # refused before touching the database
