"""Verifying the chatkit-pg identity token an MCP tool call carries.

The backend signs a short-lived JWT (EdDSA, with a ``kid``) for every ``tools/call`` and puts it
in the request's ``_meta`` under ``chatkit-pg/identity``. This server holds no secret: it fetches
the backend's public keys (its JWKS URL) and accepts a token only if it is signed by one of them,
issued by the backend (``iss``), addressed to this server (``aud`` = its URL exactly as the
backend is configured with), unexpired, and not valid for longer than the backend ever issues.
Anything else is refused, so a caller cannot claim to be someone else.

A token is also good for one call only (``ReplayGuard``): the backend mints a new one, with a
new ``jti``, for every tool call, so a second call under the same ``jti`` is someone replaying
a token they captured, and is refused. The one exception is the same call sent again (the
backend's MCP client resends a request whose answer it did not get, with the same ``_meta``):
it gets the first sending's answer, and the tool does not run twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import jwt

IDENTITY_META_KEY = "chatkit-pg/identity"
MAX_TOKEN_LIFETIME_SECONDS = 300
MAX_TOKEN_ID_LENGTH = 128  # the backend's jti is 32 hex characters

log = logging.getLogger(__name__)
T = TypeVar("T")


class IdentityError(Exception):
    """The call does not carry a token this server accepts; the message says why."""


@dataclass(frozen=True)
class Identity:
    user_id: str
    thread_id: str | None
    token_id: str  # the token's jti: one call's
    expires_at: float  # the token's exp (seconds since the epoch)


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
                options={"require": ["iss", "sub", "aud", "iat", "exp", "jti"]},
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
        subject, token_id = claims["sub"], claims["jti"]
        thread_id = claims.get("thread_id")
        if not isinstance(subject, str) or not subject:
            raise IdentityError("the identity token names no user")
        if not isinstance(token_id, str) or not 0 < len(token_id) <= MAX_TOKEN_ID_LENGTH:
            raise IdentityError("the identity token has no usable id (jti)")
        return Identity(
            subject,
            thread_id if isinstance(thread_id, str) else None,
            token_id,
            float(claims["exp"]),
        )

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


# --- one call per token -----------------------------------------------------------------------


@dataclass
class _Use:
    """The call a token was first used for: a digest of the tool and its arguments, and its
    outcome while a resend may still ask for it."""

    call: bytes
    expires_at: float
    outcome: asyncio.Task[Any] | None


@dataclass
class ReplayGuard:
    """Remembers every token id (``jti``) it has seen until the token expires, so that a token
    serves one call only.

    ``run_once(identity, tool, arguments, action)`` runs ``action`` for the first use of a
    token. Another use of it for a different call (another tool, other arguments) is a replay
    and is refused. The same call again is a resend by the backend's MCP client (it retries a
    request whose answer it did not get, with the same ``_meta``): it waits for the first
    run's outcome and returns it, so the tool never runs twice for one token, not even a
    write. Outcomes are kept ``resend_seconds`` after the run (longer than the backend's
    retries take); a resend after that is refused too.

    Bounded: at most ``max_tokens`` ids, each dropped once its token has expired (a replay is
    then refused as expired). Tokens come in about the order they expire (the backend mints
    them all with one lifetime), so expired ones are dropped from the front. Were it full of
    live ones (``max_tokens`` calls within a token lifetime), the oldest is forgotten and a
    warning logged. In memory, per process: several instances of a server need a shared
    record instead (a table with a unique ``jti``).
    """

    max_tokens: int = 100_000
    resend_seconds: float = 60.0
    leeway_seconds: float = 5.0  # as the verifier's: a token is accepted until exp + leeway
    clock: Callable[[], float] = time.time
    _uses: dict[str, _Use] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._uses)

    async def run_once(
        self,
        identity: Identity,
        tool: str,
        arguments: Mapping[str, Any],
        action: Callable[[], Awaitable[T]],
    ) -> T:
        call = hashlib.sha256(
            json.dumps([tool, arguments], sort_keys=True, default=str).encode()
        ).digest()
        use = self._uses.get(identity.token_id)
        if use is None:
            self._forget_expired()
            use = _Use(call, identity.expires_at + self.leeway_seconds, None)
            # A task of its own: the run completes (and a resend gets its outcome) even if the
            # request that started it is cancelled.
            use.outcome = asyncio.ensure_future(action())
            use.outcome.add_done_callback(lambda done: self._ran(use, done))
            self._uses[identity.token_id] = use
        elif use.call != call:
            raise IdentityError("the identity token was already used for another call")
        elif use.outcome is None:
            raise IdentityError("the identity token was already used")
        outcome: T = await asyncio.shield(use.outcome)
        return outcome

    def _ran(self, use: _Use, done: asyncio.Task[Any]) -> None:
        """Keep the outcome for resends a while, then only the fact that the token was used."""
        if not done.cancelled():
            done.exception()  # retrieved: a failed run nobody waits for any more is no error

        def drop() -> None:
            use.outcome = None

        asyncio.get_running_loop().call_later(self.resend_seconds, drop)

    def _forget_expired(self) -> None:
        now = self.clock()
        while self._uses:
            token_id, use = next(iter(self._uses.items()))
            if use.expires_at < now:
                del self._uses[token_id]
            elif len(self._uses) >= self.max_tokens:
                del self._uses[token_id]
                log.warning(
                    "replay guard full (%d live tokens): forgot one before it expired",
                    self.max_tokens,
                )
            else:
                return
