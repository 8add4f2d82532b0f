"""Verifying the chatkit-pg identity token an MCP tool call carries.

The backend signs a short-lived JWT (EdDSA, with a ``kid``) for every ``tools/call`` and puts it
in the request's ``_meta`` under ``chatkit-pg/identity``. This server holds no secret: it fetches
the backend's public keys (its JWKS URL) and accepts a token only if it is signed by one of them,
issued by the backend (``iss``), addressed to this server (``aud`` = its URL exactly as the
backend is configured with), unexpired, and not valid for longer than the backend ever issues.
Anything else is refused, so a caller cannot claim to be someone else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

IDENTITY_META_KEY = "chatkit-pg/identity"
MAX_TOKEN_LIFETIME_SECONDS = 300


class IdentityError(Exception):
    """The call does not carry a token this server accepts; the message says why."""


@dataclass(frozen=True)
class Identity:
    user_id: str
    thread_id: str | None


class IdentityVerifier:
    """Checks identity tokens against the backend's JWKS, fetched lazily and cached.

    Keys are refetched when they are older than ``cache_seconds`` or when a token names an
    unknown ``kid`` (a rotation), at most once per ``min_refetch_seconds`` so forged ``kid``
    values cannot make this server hammer the backend. If the backend cannot be reached,
    keys already known keep working."""

    def __init__(
        self,
        jwks_url: str,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: float = 5.0,
        cache_seconds: float = 300.0,
        min_refetch_seconds: float = 10.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.jwks_url = jwks_url
        self.issuer = issuer
        self.audience = audience
        self.leeway_seconds = leeway_seconds
        self.cache_seconds = cache_seconds
        self.min_refetch_seconds = min_refetch_seconds
        self._http = http or httpx.AsyncClient(timeout=5.0)
        self._owns_http = http is None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # last successful fetch (freshness)
        self._attempted_at: float | None = None  # last attempt (rate of refetches)
        self._lock = asyncio.Lock()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def verify_meta(self, meta: Mapping[str, Any] | None) -> Identity:
        """The identity in a request's ``_meta``, or ``IdentityError``."""
        token = (meta or {}).get(IDENTITY_META_KEY)
        if not isinstance(token, str) or not token:
            raise IdentityError("no identity token in the request's _meta")
        return await self.verify(token)

    async def verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise IdentityError("the identity token is malformed") from exc
        kid = header.get("kid")
        if header.get("alg") != "EdDSA" or not isinstance(kid, str):
            raise IdentityError("the identity token must be EdDSA-signed and name its key")
        key = await self._key(kid)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=["EdDSA"],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options={"require": ["iss", "sub", "aud", "iat", "exp"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise IdentityError("the identity token has expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise IdentityError("the identity token is for another server") from exc
        except jwt.InvalidIssuerError as exc:
            raise IdentityError("the identity token comes from another issuer") from exc
        except jwt.InvalidSignatureError as exc:
            raise IdentityError("the identity token's signature is invalid") from exc
        except jwt.PyJWTError as exc:
            raise IdentityError(f"the identity token is invalid ({type(exc).__name__})") from exc
        if claims["exp"] - claims["iat"] > MAX_TOKEN_LIFETIME_SECONDS:
            raise IdentityError("the identity token lives longer than the backend issues them")
        subject = claims["sub"]
        thread_id = claims.get("thread_id")
        if not isinstance(subject, str) or not subject:
            raise IdentityError("the identity token names no user")
        return Identity(subject, thread_id if isinstance(thread_id, str) else None)

    async def _key(self, kid: str) -> jwt.PyJWK:
        now = time.monotonic()
        fresh = self._fetched_at is not None and now - self._fetched_at < self.cache_seconds
        if kid in self._keys and fresh:
            return self._keys[kid]
        async with self._lock:
            now = time.monotonic()
            may_refetch = (
                self._attempted_at is None or now - self._attempted_at >= self.min_refetch_seconds
            )
            if may_refetch:
                self._attempted_at = now
                try:
                    await self._fetch()
                except (httpx.HTTPError, ValueError, jwt.PyJWTError):
                    # Known keys keep verifying while the backend is unreachable.
                    if kid not in self._keys:
                        raise IdentityError("the backend's keys cannot be fetched") from None
            if kid not in self._keys:
                raise IdentityError("the identity token is signed by an unknown key")
            return self._keys[kid]

    async def _fetch(self) -> None:
        response = await self._http.get(self.jwks_url)
        response.raise_for_status()
        keys: dict[str, jwt.PyJWK] = {}
        for entry in response.json().get("keys", []):
            if entry.get("kty") == "OKP" and entry.get("crv") == "Ed25519" and entry.get("kid"):
                keys[entry["kid"]] = jwt.PyJWK(entry, algorithm="EdDSA")
        self._keys = keys
        self._fetched_at = time.monotonic()
