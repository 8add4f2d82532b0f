"""Bearer-token authentication: JWTs verified with PyJWT, by shared secret or by JWKS.

Modes, chosen by settings:

* ``secret``: ``JWT_SECRET`` (HS256 by default).
* ``jwks``: ``JWT_JWKS_URL``; keys are fetched with httpx (never PyJWT's blocking client on
  the event loop), cached, and refetched on an unknown ``kid`` at most once per
  ``JWT_JWKS_MIN_REFETCH_SECONDS``. Every fetch has a total deadline of
  ``JWT_JWKS_TIMEOUT_SECONDS`` (however slowly the bytes trickle in) and a size cap. When the
  cache is older than ``JWT_JWKS_CACHE_SECONDS`` it is refreshed in the background while the
  keys it holds keep verifying tokens; if the issuer is down or answers garbage, the last good
  key set stays in use (an outage of the identity provider does not log everybody out). A
  ``kid`` that cannot be checked because the issuer's last fetch failed is a 503 (retry), not a
  401 (a token to throw away).
* ``dev``: neither is set; a random secret is created once in ``DATA_DIR`` and
  ``python -m app token --sub alice`` signs tokens with it. Refused when ``PRODUCTION`` is set.

The accepted algorithms are an explicit allow-list that never comes from the token; ``none``
and symmetric algorithms in JWKS mode are refused at startup. ``exp`` is required; ``iss`` and
``aud`` must match exactly when configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import jwt
from jwt import PyJWK

from app.errors import AuthenticationError, ConfigurationError, ServiceUnavailableError
from app.ids import MAX_USER_ID_CHARS
from app.sanitize import is_storable
from app.settings import Settings

log = logging.getLogger(__name__)

Mode = Literal["secret", "jwks", "dev"]

SYMMETRIC = ("HS256", "HS384", "HS512")
ASYMMETRIC = (
    "EdDSA",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
)
DEFAULT_JWKS_ALGORITHMS = ("EdDSA", "RS256", "ES256")
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
DEV_SECRET_FILE = "dev-jwt-secret"  # noqa: S105 (a file name)
MIN_PRODUCTION_SECRET_BYTES = 32
MAX_TOKEN_CHARS = 16_384
# Verified tokens are remembered (by their exact text) for at most this long, and never past
# their own expiry, so a busy client does not pay for signature checks on every request.
TOKEN_CACHE_SECONDS = 60.0
TOKEN_CACHE_SIZE = 4096
# A JWKS document is a few kilobytes; a bigger answer is not one.
MAX_JWKS_BYTES = 1024 * 1024
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]*")


# --- configuration --------------------------------------------------------------------------


def auth_mode(settings: Settings) -> Mode:
    if settings.jwt_jwks_url:
        return "jwks"
    if settings.jwt_secret is not None:
        return "secret"
    return "dev"


def allowed_algorithms(settings: Settings) -> tuple[str, ...]:
    if settings.jwt_algorithms:
        return tuple(settings.jwt_algorithms)
    return DEFAULT_JWKS_ALGORITHMS if auth_mode(settings) == "jwks" else ("HS256",)


def check_auth_settings(settings: Settings) -> None:
    """Raise ``ConfigurationError`` with every problem of the JWT settings."""
    problems: list[str] = []
    mode = auth_mode(settings)
    if settings.jwt_jwks_url and settings.jwt_secret is not None:
        problems.append("set JWT_SECRET or JWT_JWKS_URL, not both")
    algorithms = allowed_algorithms(settings)
    for alg in algorithms:
        if alg.lower() == "none":
            problems.append("JWT_ALGORITHMS may not contain 'none'")
        elif mode == "jwks" and alg not in ASYMMETRIC:
            problems.append(f"JWT_ALGORITHMS: {alg} cannot be used with JWKS keys")
        elif mode != "jwks" and alg not in SYMMETRIC:
            problems.append(f"JWT_ALGORITHMS: {alg} needs JWT_JWKS_URL (a shared secret is HS*)")
    if not settings.jwt_user_claim.strip():
        problems.append("JWT_USER_CLAIM may not be empty")
    if settings.jwt_jwks_url:
        parts = urlsplit(settings.jwt_jwks_url)
        local = parts.hostname in ("localhost", "127.0.0.1", "::1")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append("JWT_JWKS_URL must be an http(s) URL")
        elif settings.production and parts.scheme != "https" and not local:
            problems.append("JWT_JWKS_URL must use https in production")
    if settings.production:
        if mode == "dev":
            problems.append(
                "PRODUCTION is set but no JWT configuration was given: set JWT_JWKS_URL "
                "(your identity provider's JWKS) or JWT_SECRET (a shared HS256 secret)"
            )
        secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        if secret is not None and len(secret.encode()) < MIN_PRODUCTION_SECRET_BYTES:
            problems.append(
                f"JWT_SECRET must be at least {MIN_PRODUCTION_SECRET_BYTES} bytes in production"
            )
    if problems:
        raise ConfigurationError("invalid authentication settings: " + "; ".join(problems))


def dev_secret(data_dir: Path) -> str:
    """The development signing secret, created once (mode 0600) in ``data_dir``."""
    path = data_dir / DEV_SECRET_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secrets.token_urlsafe(48))
    return path.read_text(encoding="utf-8").strip()


def signing_secret(settings: Settings) -> str:
    """The HS secret this deployment verifies with (and the CLI signs dev tokens with)."""
    mode = auth_mode(settings)
    if mode == "jwks":
        raise ConfigurationError(
            "tokens come from the identity provider at JWT_JWKS_URL; this server cannot sign them"
        )
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value()
    return dev_secret(settings.data_dir)


def mint_token(settings: Settings, subject: str, *, ttl_seconds: int = 24 * 3600) -> str:
    """A token this server accepts, for development and tests (HS modes only)."""
    check_auth_settings(settings)
    secret = signing_secret(settings)
    algorithm = next((a for a in allowed_algorithms(settings) if a in SYMMETRIC), None)
    if algorithm is None:
        raise ConfigurationError("no HS algorithm is allowed by JWT_ALGORITHMS")
    now = int(time.time())
    claims: dict[str, Any] = {
        settings.jwt_user_claim: subject,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, secret, algorithm=algorithm)


# --- JWKS -----------------------------------------------------------------------------------


def _compatible(jwk: dict[str, Any], alg: str) -> bool:
    """Whether a JWK may verify ``alg``: its own ``alg`` (if any) and its key type must agree."""
    declared = jwk.get("alg")
    if declared is not None and declared != alg:
        return False
    if jwk.get("use", "sig") != "sig":
        return False
    kty = jwk.get("kty")
    if alg.startswith(("RS", "PS")):
        return kty == "RSA"
    if alg in _EC_CURVES:
        return kty == "EC" and jwk.get("crv") == _EC_CURVES[alg]
    if alg == "EdDSA":
        return kty == "OKP" and jwk.get("crv") in ("Ed25519", "Ed448")
    return False


class JwksCache:
    """The issuer's public keys, fetched asynchronously and refetched sparingly.

    * Requests whose ``kid`` is in the cached set never wait for the issuer: an expired cache
      is refreshed by a background task while the cached keys go on verifying.
    * A fetch that fails (unreachable, slow, an error status, not a key set) leaves the last
      good key set in place.
    * An unknown ``kid`` triggers a refetch at most once per ``min_refetch_seconds``; while
      throttled it is a 401, unless the last fetch failed (then 503: the key may be new).
    """

    def __init__(
        self,
        url: str,
        *,
        cache_seconds: float,
        min_refetch_seconds: float,
        timeout: float,
        max_stale_seconds: float = float("inf"),
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self._cache_seconds = cache_seconds
        self._max_stale = max_stale_seconds
        self._min_refetch = min_refetch_seconds
        self._timeout = timeout
        self._client = client or httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        self._owns_client = client is None
        self._lock = asyncio.Lock()
        self._keys: list[dict[str, Any]] = []
        self._loaded = False
        self._fetched_at = 0.0
        self._last_attempt = float("-inf")
        self._last_failed = False
        self._generation = 0
        self._parsed: dict[tuple[int, str], PyJWK] = {}
        self._background: asyncio.Task[bool] | None = None
        self.fetches = 0

    async def aclose(self) -> None:
        task, self._background = self._background, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_client:
            await self._client.aclose()

    async def key_for(self, kid: str | None, alg: str) -> PyJWK:
        if not self._loaded:
            await self._refresh(min_interval=min(1.0, self._min_refetch))
            if not self._loaded:
                raise ServiceUnavailableError("The token issuer's keys are unavailable.")
        elif (age := time.monotonic() - self._fetched_at) > self._cache_seconds:
            self._refresh_in_background()
            if age > self._cache_seconds + self._max_stale:
                # The issuer has been unreachable for too long: a key it has since revoked
                # would still be trusted.
                raise ServiceUnavailableError("The token issuer's keys are out of date.")
        key = self._lookup(kid, alg)
        unknown_kid = kid is not None and all(k.get("kid") != kid for k in self._keys)
        # A kid we have never seen: the issuer may have rotated its keys.
        if key is None and unknown_kid:
            if await self._refresh(min_interval=self._min_refetch):
                key = self._lookup(kid, alg)
            elif self._last_failed:
                raise ServiceUnavailableError("The token issuer's keys are unavailable.")
        if key is None:
            raise AuthenticationError(
                "The token's signing key is not trusted.", bearer_error="invalid_token"
            )
        return key

    def _refresh_in_background(self) -> None:
        """Start refreshing an expired key set, unless a refresh runs or was just tried."""
        if self._background is not None and not self._background.done():
            return
        if time.monotonic() - self._last_attempt < self._min_refetch:
            return
        task = asyncio.create_task(
            self._refresh(min_interval=self._min_refetch), name="jwks-refresh"
        )
        task.add_done_callback(_log_failure)
        self._background = task

    def _lookup(self, kid: str | None, alg: str) -> PyJWK | None:
        candidates = [
            (i, k)
            for i, k in enumerate(self._keys)
            if (kid is None or k.get("kid") == kid) and _compatible(k, alg)
        ]
        if len(candidates) != 1:
            return None  # unknown, or ambiguous without a kid
        index, jwk = candidates[0]
        cache_key = (index, alg)
        if cache_key not in self._parsed:
            try:
                self._parsed[cache_key] = PyJWK(jwk, algorithm=alg)
            except jwt.PyJWTError:
                log.warning("JWKS key %s cannot be used for %s", jwk.get("kid"), alg)
                return None
        return self._parsed[cache_key]

    async def _fetch(self) -> list[dict[str, Any]]:
        """One GET of the key set, within ``timeout`` seconds in all; raises on anything that
        is not a JSON object with at least one key in its ``keys`` list."""
        async with asyncio.timeout(self._timeout):
            async with self._client.stream(
                "GET", self.url, headers={"Accept": "application/json"}
            ) as response:
                response.raise_for_status()
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError("the JWKS document is too large")
        document = json.loads(body)
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise ValueError("no 'keys' list")
        usable = [k for k in keys if _usable(k)]
        if not usable:
            raise ValueError("no usable key in the 'keys' list")
        return usable

    async def _refresh(self, *, min_interval: float) -> bool:
        """Fetch the key set unless one was attempted less than ``min_interval`` seconds ago."""
        generation = self._generation
        async with self._lock:
            if self._generation != generation:
                return True  # another request fetched while we waited
            if time.monotonic() - self._last_attempt < min_interval:
                return False
            self._last_attempt = time.monotonic()
            self.fetches += 1
            try:
                keys = await self._fetch()
            # RecursionError: json refuses documents nested too deeply.
            except (httpx.HTTPError, TimeoutError, ValueError, RecursionError) as exc:
                # The window starts again when an attempt ends: requests that queued behind a
                # slow failure must not each try again.
                self._last_attempt = time.monotonic()
                self._last_failed = True
                log.warning(
                    "fetching the JWKS failed: %s", type(exc).__name__, extra={"url": self.url}
                )
                return False
            self._keys = keys
            self._parsed.clear()
            self._loaded = True
            self._last_failed = False
            self._fetched_at = time.monotonic()
            self._generation += 1
            log.info("loaded %d JWKS keys", len(self._keys), extra={"url": self.url})
            return True


def _usable(jwk: Any) -> bool:
    """Whether a JWKS entry is a public signing key PyJWT can load (others are ignored; a key
    set with none is not a key set)."""
    if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC", "OKP"):
        return False
    if jwk.get("use", "sig") != "sig" or "d" in jwk:  # never a private key
        return False
    try:
        PyJWK(jwk)
    except (jwt.PyJWTError, ValueError, TypeError):
        return False
    return True


def _log_failure(task: asyncio.Task[bool]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("refreshing the JWKS failed", exc_info=exc)


# --- verification ---------------------------------------------------------------------------


def _invalid(message: str) -> AuthenticationError:
    return AuthenticationError(message, bearer_error="invalid_token")


@dataclass(frozen=True)
class _Checks:
    algorithms: tuple[str, ...]
    issuer: str | None
    audience: str | None
    user_claim: str
    leeway: int


class TokenVerifier:
    """Turns an ``Authorization`` header into the user id it proves, or raises 401."""

    def __init__(
        self,
        *,
        mode: Mode,
        checks: _Checks,
        secret: bytes | None = None,
        jwks: JwksCache | None = None,
    ) -> None:
        self.mode = mode
        self._checks = checks
        self._secret = secret
        self.jwks = jwks
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (user id, valid until)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        check_auth_settings(settings)
        mode = auth_mode(settings)
        checks = _Checks(
            algorithms=allowed_algorithms(settings),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            user_claim=settings.jwt_user_claim,
            leeway=settings.jwt_leeway_seconds,
        )
        if mode == "jwks":
            assert settings.jwt_jwks_url is not None
            jwks = JwksCache(
                settings.jwt_jwks_url,
                cache_seconds=settings.jwt_jwks_cache_seconds,
                min_refetch_seconds=settings.jwt_jwks_min_refetch_seconds,
                timeout=settings.jwt_jwks_timeout_seconds,
                max_stale_seconds=settings.jwt_jwks_max_stale_seconds,
            )
            return cls(mode=mode, checks=checks, jwks=jwks)
        if mode == "dev":
            log.warning(
                "no JWT_SECRET or JWT_JWKS_URL: development mode, tokens are signed with a "
                "local secret in DATA_DIR (python -m app token --sub <user>); never use this "
                "in production"
            )
        return cls(mode=mode, checks=checks, secret=signing_secret(settings).encode())

    async def aclose(self) -> None:
        if self.jwks is not None:
            await self.jwks.aclose()

    async def authenticate(self, authorization: str | None) -> str:
        if not authorization or not authorization.strip():
            raise AuthenticationError()
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError(
                "Use an Authorization: Bearer <token> header.", bearer_error="invalid_request"
            )
        return await self.verify(token)

    async def verify(self, token: str) -> str:
        cached = self._verified.get(token)
        if cached is not None:
            if cached[1] > time.monotonic():
                return cached[0]
            del self._verified[token]
        user_id, expires_at = await self._verify(token)
        lifetime = min(TOKEN_CACHE_SECONDS, expires_at + self._checks.leeway - time.time())
        if lifetime > 0:
            if len(self._verified) >= TOKEN_CACHE_SIZE:
                self._verified.pop(next(iter(self._verified)))  # the oldest entry
            self._verified[token] = (user_id, time.monotonic() + lifetime)
        return user_id

    async def _verify(self, token: str) -> tuple[str, float]:
        """Full verification; returns the user id and the token's ``exp``."""
        checks = self._checks
        if len(token) > MAX_TOKEN_CHARS or not _TOKEN_SHAPE.fullmatch(token):
            raise _invalid("The bearer token is malformed.")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("The bearer token is malformed.") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in checks.algorithms:
            raise _invalid("The token's algorithm is not accepted.")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid("The bearer token is malformed.")
        key: PyJWK | bytes
        if self.jwks is not None:
            key = await self.jwks.key_for(kid, alg)
        else:
            assert self._secret is not None
            key = self._secret
        required = ["exp"]
        if checks.issuer:
            required.append("iss")
        if checks.audience:
            required.append("aud")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=checks.audience,
                issuer=checks.issuer,
                leeway=checks.leeway,
                options={"require": required},
            )
        except jwt.ExpiredSignatureError:
            raise _invalid("The token has expired.") from None
        except jwt.PyJWTError as exc:
            log.info("rejected a bearer token", extra={"reason": type(exc).__name__})
            raise _invalid("The token is invalid.") from None
        user_id = claims.get(checks.user_claim)
        if (
            not isinstance(user_id, str)
            or not user_id.strip()
            or len(user_id) > MAX_USER_ID_CHARS
            or not is_storable(user_id)
        ):
            raise _invalid("The token does not name a user.")
        return user_id, float(claims["exp"])
