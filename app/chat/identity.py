"""Who is asking, for MCP servers: short-lived identity tokens signed by this backend.

The agent's MCP tools run in other processes, behind one MCP session shared by every user. So
that a tool can act for the right user without trusting an id anyone could send (or receiving
the user's own bearer token, which MCP's security guidance forbids passing through), every
``tools/call`` carries a JWT in its ``_meta`` under ``chatkit-pg/identity``:

* signed with Ed25519 (``alg: EdDSA``), the header naming the key (``kid``, its RFC 7638
  thumbprint), so a server verifies it with the public keys at ``/.well-known/jwks.json``
  and holds no secret that could mint one;
* ``iss`` = ``PUBLIC_BASE_URL``, ``sub`` = the user id, ``aud`` = that MCP server's URL exactly
  as listed in ``MCP_SERVER_URLS`` (a token for one server is refused by another), ``iat``,
  ``exp`` (at most 300 s later), ``thread_id``, and a random ``jti``.

The private key is a PEM file (``IDENTITY_SIGNING_KEY_FILE``, shared by every replica); in
development one is generated once into ``DATA_DIR`` (mode 0600). During a rotation the previous
public key (``IDENTITY_PREVIOUS_PUBLIC_KEY_FILE``) stays in the JWKS so tokens signed just
before the switch still verify. docs/mcp-identity.md is the guide for MCP server authors.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.errors import ConfigurationError
from app.settings import Settings

IDENTITY_META_KEY = "chatkit-pg/identity"
JWKS_PATH = "/.well-known/jwks.json"
DEV_KEY_FILE = "identity-signing-key.pem"
MAX_TOKEN_TTL_SECONDS = 300
ALGORITHM = "EdDSA"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(key: Ed25519PublicKey) -> dict[str, str]:
    """The key as a JWK whose ``kid`` is its RFC 7638 thumbprint (stable, derived, unique)."""
    x = _b64url(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    # RFC 7638: the required members only, sorted, no whitespace.
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    kid = _b64url(hashlib.sha256(canonical.encode()).digest())
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": ALGORITHM}


@dataclass
class IdentitySigner:
    """Mints identity tokens with the current key; publishes current and previous keys."""

    private_key: Ed25519PrivateKey
    issuer: str
    ttl_seconds: int = MAX_TOKEN_TTL_SECONDS
    previous_public_key: Ed25519PublicKey | None = None
    clock: Callable[[], float] = time.time
    _jwk: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.ttl_seconds <= MAX_TOKEN_TTL_SECONDS:
            raise ValueError(f"identity tokens live at most {MAX_TOKEN_TTL_SECONDS} s")
        self._jwk = public_jwk(self.private_key.public_key())

    @property
    def kid(self) -> str:
        return self._jwk["kid"]

    def mint(self, *, user_id: str, audience: str, thread_id: str | None) -> str:
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user_id,
            "aud": audience,
            "iat": now,
            "exp": now + self.ttl_seconds,
            "thread_id": thread_id,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(
            claims, self.private_key, algorithm=ALGORITHM, headers={"kid": self.kid, "typ": "JWT"}
        )

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        keys = [dict(self._jwk)]
        if self.previous_public_key is not None:
            previous = public_jwk(self.previous_public_key)
            if previous["kid"] != self.kid:
                keys.append(previous)
        return {"keys": keys}


# --- keys ---------------------------------------------------------------------------------


def _read_private_key(path: Path, setting: str) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {setting} {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{setting} {path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(
            f"{setting} {path} must be an Ed25519 key "
            "(openssl genpkey -algorithm ed25519 -out FILE)"
        )
    return key


def _read_public_key(path: Path, setting: str) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {setting} {path}: {exc.strerror}") from exc
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        # A private key file is accepted too: its public half is what is published.
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"{setting} {path} is not a PEM Ed25519 key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigurationError(f"{setting} {path} must be an Ed25519 key")
    return key


def dev_key_file(data_dir: Path) -> Path:
    """The development signing key, generated once (mode 0600) in ``data_dir``.

    Written to a private temporary file, then linked into place: several workers starting at
    once all end up with the one key that won, and nobody ever reads a half-written file."""
    path = data_dir / DEV_KEY_FILE
    if path.exists():
        return path
    data_dir.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temporary = data_dir / f".{DEV_KEY_FILE}.{os.getpid()}.{uuid.uuid4().hex}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        # Another process may have won the race: its key is then the key.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_identity(settings: Settings) -> IdentitySigner | None:
    """The signer the settings describe; ``None`` only in production with no MCP server and
    no key (nothing is ever signed then, and the JWKS is empty).

    Raises ``ConfigurationError`` (one line naming the setting) for a missing, unreadable or
    wrong key; called before serving, so a mistake stops startup rather than a tool call."""
    path = settings.identity_signing_key_file
    if path is None:
        if settings.production:
            if settings.mcp_server_urls:
                raise ConfigurationError(
                    "PRODUCTION is set and MCP_SERVER_URLS is not empty: set "
                    "IDENTITY_SIGNING_KEY_FILE to an Ed25519 PEM private key shared by every "
                    "replica (openssl genpkey -algorithm ed25519 -out FILE)"
                )
            if settings.identity_previous_public_key_file is None:
                return None
            raise ConfigurationError(
                "IDENTITY_PREVIOUS_PUBLIC_KEY_FILE is set without IDENTITY_SIGNING_KEY_FILE"
            )
        path = dev_key_file(settings.data_dir)
    private_key = _read_private_key(path, "IDENTITY_SIGNING_KEY_FILE")
    previous = None
    if settings.identity_previous_public_key_file is not None:
        previous = _read_public_key(
            settings.identity_previous_public_key_file, "IDENTITY_PREVIOUS_PUBLIC_KEY_FILE"
        )
    return IdentitySigner(
        private_key,
        issuer=settings.public_base_url,
        ttl_seconds=settings.identity_ttl_seconds,
        previous_public_key=previous,
    )


# --- the JWKS route -------------------------------------------------------------------------

router = APIRouter()


@router.get(JWKS_PATH, include_in_schema=False)
async def jwks(request: Request) -> Response:
    """The public keys, without authentication: MCP servers fetch them to verify tokens.
    Cached briefly, so a rotation reaches verifiers within minutes."""
    signer: IdentitySigner | None = getattr(request.app.state, "identity", None)
    body = signer.jwks() if signer is not None else {"keys": []}
    return Response(
        json.dumps(body, separators=(",", ":")),
        media_type="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )
