"""The identity provider's JWKS endpoint down, slow or broken, against the real app over HTTP.

tests/http/test_auth.py covers JWKS verification itself (EdDSA, RS256, ES256, forgeries, the
refetch throttle for a handful of unknown kids, rotation, an issuer unreachable from the start).
Here the issuer misbehaves *after* or *while* keys are in use, and what is measured is what a
client sees: status, body and time.

* the issuer's JWKS is served by ``http.server`` in a thread of its own (so a slow or stopped
  issuer is independent of the event loop the app runs on), with switchable faults, counting
  every fetch;
* the app is ``create_app`` served by uvicorn on loopback (``tests.harness.loopback``), backed by the
  session's PostgreSQL; every request is a ``threads.list`` with a token of its own (a fresh
  user each time, so the verified-token cache never answers for the issuer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from app.errors import ServiceUnavailableError
from app.main import create_app
from app.settings import Settings
from tests.harness.chatkit_client import AUDIENCE, ISSUER, claims
from tests.harness.loopback import serve

UNAVAILABLE = ServiceUnavailableError.public_message
LEAK_MARKERS = re.compile(
    r"Traceback|Exception|Error\b|httpx|JSONDecode|Recursion|Expecting|SECRET-INTERNALS|File \"",
)

# --- a misbehaving identity provider -----------------------------------------------------------

DRIP_BYTES = 30  # then the connection closes (so a test that fails does not hang)
MODES = (
    "ok",  # the key set
    "slow",  # the key set after `delay` seconds
    "drip",  # the key set one byte every `delay` seconds (each read is quick)
    "status500",  # an error page with internals in it
    "html",  # 200, a login page
    "notjson",  # 200, application/json, not JSON
    "nokeys",  # {"keys": "..."}
    "emptykeys",  # {"keys": []}
    "badkeys",  # only keys that cannot be parsed
    "deep",  # JSON nested deeper than the parser allows
    "huge",  # a 2 MiB document
    "redirect",  # 302 elsewhere
)


@dataclass
class FaultyIssuer:
    keys: dict[str, tuple[Any, str]] = field(default_factory=dict)  # kid -> (private key, alg)
    published: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "ok"
    delay: float = 0.0
    fetches: list[float] = field(default_factory=list)  # time.monotonic() of each request
    in_flight: int = 0
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    def add(self, kid: str, private: Any, alg: str) -> None:
        public = private.public_key()
        to_jwk = {"EdDSA": OKPAlgorithm, "RS256": RSAAlgorithm}.get(alg, ECAlgorithm)
        self.keys[kid] = (private, alg)
        jwk = json.loads(to_jwk.to_jwk(public))  # type: ignore[attr-defined]
        self.published.append(jwk | {"kid": kid, "alg": alg, "use": "sig"})

    def token(self, kid: str, **over: Any) -> str:
        private, alg = self.keys[kid]
        payload = claims(iss=ISSUER, aud=AUDIENCE, sub=f"user-{secrets.token_hex(6)}") | over
        return jwt.encode(payload, private, algorithm=alg, headers={"kid": kid})

    def fetch_count(self) -> int:
        with self._lock:
            return len(self.fetches)

    # the HTTP side, in its own threads

    def body(self) -> tuple[int, str, bytes, dict[str, str]]:
        good = json.dumps({"keys": self.published}).encode()
        mode = self.mode
        if mode in ("ok", "slow", "drip"):
            return 200, "application/json", good, {}
        if mode == "status500":
            page = b"<h1>500</h1><pre>Traceback: SECRET-INTERNALS db password=hunter2</pre>"
            return 500, "text/html", page, {}
        if mode == "html":
            return 200, "text/html", b"<html><body>Please log in</body></html>", {}
        if mode == "notjson":
            return 200, "application/json", b'{"keys": [ {"kty": "RSA", ', {}
        if mode == "nokeys":
            return 200, "application/json", b'{"keys": "SECRET-INTERNALS"}', {}
        if mode == "emptykeys":
            return 200, "application/json", b'{"keys": []}', {}
        if mode == "badkeys":
            bad = [
                {"kty": "RSA", "kid": kid, "n": "!!!", "e": "AQAB", "alg": "RS256"}
                for kid in self.keys
            ] + [{"kty": "OKP", "kid": "x", "crv": "Ed25519", "x": 5}, {"kty": 7}, "junk"]
            return 200, "application/json", json.dumps({"keys": bad}).encode(), {}
        if mode == "deep":
            return 200, "application/json", b"[" * 200_000 + b"]" * 200_000, {}
        if mode == "huge":
            padded = good[:-1] + b" " * (2 * 1024 * 1024) + b"}"
            return 200, "application/json", padded, {}
        if mode == "redirect":
            return 302, "text/plain", b"", {"Location": "http://127.0.0.1:9/evil-jwks.json"}
        raise AssertionError(mode)

    def start(self) -> FaultyIssuer:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with issuer._lock:
                    issuer.fetches.append(time.monotonic())
                    issuer.in_flight += 1
                try:
                    status, kind, body, headers = issuer.body()
                    if issuer.mode == "slow" and issuer._stopping.wait(issuer.delay):
                        return
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    if issuer.mode == "drip":
                        for i in range(min(len(body), DRIP_BYTES)):
                            if issuer._stopping.wait(issuer.delay):
                                return
                            self.wfile.write(body[i : i + 1])
                            self.wfile.flush()
                    else:
                        self.wfile.write(body)
                finally:
                    with issuer._lock:
                        issuer.in_flight -= 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up (the app's deadline) is expected here

        self._stopping.clear()
        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket: from now on, connection refused."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


@pytest.fixture
def idp() -> Iterator[FaultyIssuer]:
    issuer = FaultyIssuer()
    issuer.add("ed-1", ed25519.Ed25519PrivateKey.generate(), "EdDSA")
    issuer.add("rsa-1", rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")
    issuer.add("ec-1", ec.generate_private_key(ec.SECP256R1()), "ES256")
    issuer.start()
    try:
        yield issuer
    finally:
        issuer.stop()


STRANGER = ed25519.Ed25519PrivateKey.generate()


def unknown_kid_token(kid: str | None = None) -> str:
    """Signed by nobody the issuer knows, under a kid the issuer never published."""
    payload = claims(iss=ISSUER, aud=AUDIENCE, sub=f"user-{secrets.token_hex(6)}")
    kid = kid or f"random-{secrets.token_hex(8)}"
    return jwt.encode(payload, STRANGER, algorithm="EdDSA", headers={"kid": kid})


# --- the app ---------------------------------------------------------------------------------


class ManualClock:
    """A monotonic clock that moves only when told: the JWKS cache's TTL, refetch window and
    stale allowance pass exactly when a test says so, however loaded the machine."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.asynccontextmanager
async def app_for(
    test_settings: Settings, idp: FaultyIssuer, clock: ManualClock | None = None, **over: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = test_settings.model_copy(
        update={
            "jwt_secret": None,
            "jwt_jwks_url": idp.url,
            "jwt_issuer": ISSUER,
            "jwt_audience": AUDIENCE,
            "log_level": "ERROR",
            **over,
        }
    )
    app = create_app(settings)
    async with (
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=60) as client,
    ):
        if clock is not None:  # before the first request, so every time is on it
            app.state.runtime.verifier.jwks.clock = clock
        yield client


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: httpx.Headers
    seconds: float
    done_at: float
    text: str


async def ask(client: httpx.AsyncClient, token: str) -> Answer:
    started = time.monotonic()
    response = await client.post(
        "/chatkit",
        json={"type": "threads.list", "params": {}},
        headers={"Authorization": f"Bearer {token}"},
    )
    done = time.monotonic()
    assert response.headers["content-type"].startswith("application/json"), response.text
    return Answer(
        response.status_code,
        response.json(),
        response.headers,
        done - started,
        done,
        response.text,
    )


def assert_ok(answer: Answer) -> None:
    assert answer.status == 200, answer.text
    assert answer.body["data"] == []


def assert_unavailable(answer: Answer) -> None:
    """503, a JSON error with the public message only: nothing from the issuer or a library."""
    assert answer.status == 503, answer.text
    assert answer.body["error"]["code"] == "unavailable"
    assert answer.body["error"]["message"] == UNAVAILABLE
    assert set(answer.body["error"]) <= {"code", "message", "request_id"}
    assert not LEAK_MARKERS.search(answer.text), answer.text


def assert_unauthorized(answer: Answer) -> None:
    assert answer.status == 401, answer.text
    assert answer.body["error"]["code"] == "unauthorized"
    assert answer.body["error"]["message"] == "The token's signing key is not trusted."
    assert 'error="invalid_token"' in answer.headers["www-authenticate"]
    assert not LEAK_MARKERS.search(answer.text), answer.text


# --- (a) the issuer goes away ------------------------------------------------------------------


async def test_issuer_down_cached_keys_keep_working_past_their_ttl(
    test_settings: Settings, idp: FaultyIssuer
) -> None:
    clock = ManualClock()
    async with app_for(
        test_settings,
        idp,
        clock,
        jwt_jwks_cache_seconds=0.5,
        jwt_jwks_min_refetch_seconds=0.2,
        jwt_jwks_timeout_seconds=1.0,
    ) as client:
        for kid in ("ed-1", "rsa-1", "ec-1"):
            assert_ok(await ask(client, idp.token(kid)))
        assert idp.fetch_count() == 1

        idp.stop()  # connection refused from now on
        clock.advance(0.7)  # the cache is past its TTL
        answers = []
        for _ in range(10):  # 1.5 s on the cache's clock: several failed refreshes
            for kid in ("ed-1", "rsa-1", "ec-1"):
                answers.append(await ask(client, idp.token(kid)))
            clock.advance(0.15)
        for answer in answers:
            assert_ok(answer)
        # A kid the issuer might have published since cannot be checked: retry later.
        assert_unavailable(await ask(client, unknown_kid_token()))

        # The issuer comes back with a rotated key: it is fetched, the old ones still work.
        idp.add("ed-2", ed25519.Ed25519PrivateKey.generate(), "EdDSA")
        idp.start()
        clock.advance(0.25)  # past the refetch window
        assert_ok(await ask(client, idp.token("ed-2")))
        assert_ok(await ask(client, idp.token("rsa-1")))
        assert idp.fetch_count() >= 2


async def test_issuer_down_too_long_stops_trusting_the_cached_keys(
    test_settings: Settings, idp: FaultyIssuer
) -> None:
    """JWT_JWKS_MAX_STALE_SECONDS bounds how long keys the issuer may have revoked meanwhile
    stay trusted; once it answers again, tokens work again without a restart."""
    clock = ManualClock()
    async with app_for(
        test_settings,
        idp,
        clock,
        jwt_jwks_cache_seconds=0.5,
        jwt_jwks_min_refetch_seconds=0.2,
        jwt_jwks_timeout_seconds=1.0,
        jwt_jwks_max_stale_seconds=1.0,
    ) as client:
        assert_ok(await ask(client, idp.token("rsa-1")))
        idp.stop()
        clock.advance(0.8)  # past the TTL, within the stale allowance
        assert_ok(await ask(client, idp.token("rsa-1")))
        clock.advance(1.0)  # past TTL + allowance
        assert_unavailable(await ask(client, idp.token("rsa-1")))
        assert_unavailable(await ask(client, idp.token("ed-1")))

        idp.start()
        # Each request past the refetch window starts a background refresh; the first that
        # reaches the issuer again restores trust (the bound is attempts, not time).
        for _ in range(100):
            answer = await ask(client, idp.token("rsa-1"))
            if answer.status == 200:
                break
            assert_unavailable(answer)
            clock.advance(0.25)
            await asyncio.sleep(0.05)  # room for the background refresh to run
        assert answer.status == 200, "never trusted again"
        assert idp.fetch_count() >= 2


# --- (b) the issuer is slow --------------------------------------------------------------------

TIMEOUT = 3.0
MARGIN = 2.0  # scheduling slack on a busy test machine
FAST = 2.0  # a request that did not wait for the issuer (well under 0.8 x TIMEOUT)


async def test_slow_issuer_unknown_kid_is_bounded_and_blocks_nobody(
    test_settings: Settings, idp: FaultyIssuer
) -> None:
    async with app_for(
        test_settings,
        idp,
        jwt_jwks_timeout_seconds=TIMEOUT,
        jwt_jwks_min_refetch_seconds=0.0,
    ) as client:
        assert_ok(await ask(client, idp.token("ed-1")))
        idp.mode, idp.delay = "slow", 6.0

        slow = asyncio.create_task(ask(client, unknown_kid_token()))
        while idp.in_flight == 0:  # the refetch has reached the issuer
            await asyncio.sleep(0.005)
        known = await asyncio.gather(
            *(ask(client, idp.token(kid)) for kid in ("ed-1", "rsa-1", "ec-1") * 7)
        )
        assert idp.in_flight == 1 and not slow.done(), "the known kids waited for the issuer"
        for answer in known:
            assert_ok(answer)
            assert answer.seconds < FAST, answer.seconds
        unknown = await slow
        assert_unavailable(unknown)
        assert TIMEOUT * 0.8 <= unknown.seconds <= TIMEOUT + MARGIN, unknown.seconds
        assert all(a.done_at < unknown.done_at for a in known)

        # An issuer that sends its answer one byte at a time: each read is quick, the whole
        # is not. The deadline is for the fetch, not for each read.
        idp.mode, idp.delay = "drip", 0.2
        drip = await ask(client, unknown_kid_token())
        assert_unavailable(drip)
        assert drip.seconds <= TIMEOUT + MARGIN, drip.seconds
        assert_ok(await ask(client, idp.token("rsa-1")))


async def test_slow_issuer_expired_cache_is_refreshed_in_the_background(
    test_settings: Settings, idp: FaultyIssuer
) -> None:
    """Past the cache TTL, requests go on with the cached keys while the refresh runs."""
    async with app_for(
        test_settings,
        idp,
        jwt_jwks_cache_seconds=0.5,
        jwt_jwks_timeout_seconds=2.0,
        jwt_jwks_min_refetch_seconds=0.0,
    ) as client:
        assert_ok(await ask(client, idp.token("ec-1")))
        idp.mode, idp.delay = "slow", 6.0
        await asyncio.sleep(0.6)
        answers = await asyncio.gather(
            *(ask(client, idp.token(kid)) for kid in ("ed-1", "rsa-1", "ec-1") * 5)
        )
        for answer in answers:
            assert_ok(answer)
            assert answer.seconds < FAST, answer.seconds
        assert idp.fetch_count() == 2 and idp.in_flight == 1  # one refresh, still waiting
        # When the refresh gives up, the cached keys are still the ones in use.
        await asyncio.sleep(2.2)
        assert_ok(await ask(client, idp.token("ed-1")))


async def test_slow_issuer_before_any_key_is_a_bounded_503(
    test_settings: Settings, idp: FaultyIssuer
) -> None:
    idp.mode, idp.delay = "slow", 6.0
    async with app_for(test_settings, idp, jwt_jwks_timeout_seconds=TIMEOUT) as client:
        answers = await asyncio.gather(*(ask(client, idp.token("ed-1")) for _ in range(5)))
        for answer in answers:
            assert_unavailable(answer)
            assert answer.seconds <= TIMEOUT + MARGIN, answer.seconds
        assert idp.fetch_count() == 1  # the others waited for that one attempt


# --- (c) a storm of unknown kids -----------------------------------------------------------------


async def storm(
    client: httpx.AsyncClient, waves: int, per_wave: int, gap: float
) -> tuple[list[Answer], float]:
    started = time.monotonic()
    answers: list[Answer] = []
    for _ in range(waves):
        answers += await asyncio.gather(
            *(ask(client, unknown_kid_token()) for _ in range(per_wave))
        )
        await asyncio.sleep(gap)
    return answers, time.monotonic() - started


async def test_unknown_kid_storm_refetches_at_most_once_per_window(
    test_settings: Settings, idp: FaultyIssuer
) -> None:
    window = 1.0
    async with app_for(test_settings, idp, jwt_jwks_min_refetch_seconds=window) as client:
        assert_ok(await ask(client, idp.token("ed-1")))
        first = idp.fetches[0]
        answers, seconds = await storm(client, waves=10, per_wave=20, gap=0.25)
        assert len(answers) == 200 and seconds >= 2 * window
        for answer in answers:
            assert_unauthorized(answer)
            assert answer.seconds < FAST, answer.seconds
        refetches = idp.fetches[1:]
        assert 1 <= len(refetches) <= int((idp.fetches[-1] - first) / window) + 1
        gaps = [b - a for a, b in zip(idp.fetches, idp.fetches[1:], strict=False)]
        assert all(g >= window * 0.95 for g in gaps), gaps
        assert_ok(await ask(client, idp.token("rsa-1")))  # unharmed

    # With the default window (30 s), a storm right after the keys were fetched costs nothing.
    idp.fetches.clear()
    async with app_for(test_settings, idp) as client:
        assert_ok(await ask(client, idp.token("ec-1")))
        answers, _ = await storm(client, waves=4, per_wave=50, gap=0.0)
        for answer in answers:
            assert_unauthorized(answer)
        assert idp.fetch_count() == 1


# --- (d) the issuer answers garbage --------------------------------------------------------------

GARBAGE = [m for m in MODES if m not in ("ok", "slow", "drip")]


async def test_garbage_from_the_issuer_is_a_clean_503_and_cached_keys_survive(
    test_settings: Settings, idp: FaultyIssuer
) -> None:
    async with app_for(
        test_settings,
        idp,
        jwt_jwks_cache_seconds=0.05,
        jwt_jwks_min_refetch_seconds=0.0,
        jwt_jwks_timeout_seconds=TIMEOUT,
    ) as client:
        # Before any good key set: every kind of garbage is a 503 with a JSON body.
        for mode in GARBAGE:
            idp.mode = mode
            before = idp.fetch_count()
            answer = await ask(client, idp.token("rsa-1"))
            assert idp.fetch_count() == before + 1, mode
            assert_unavailable(answer)
            assert answer.seconds <= TIMEOUT + MARGIN, (mode, answer.seconds)

        idp.mode = "ok"
        assert_ok(await ask(client, idp.token("ed-1")))

        # With keys cached (and always past their TTL here), garbage replaces nothing.
        for mode in GARBAGE:
            idp.mode = mode
            for kid in ("ed-1", "rsa-1", "ec-1"):
                assert_ok(await ask(client, idp.token(kid)))
            assert_unavailable(await ask(client, unknown_kid_token()))
        assert idp.fetch_count() >= 2 * len(GARBAGE)

        # A key set with some broken keys is still a key set: the good ones are used.
        idp.mode = "ok"
        idp.published.append({"kty": "RSA", "kid": "broken", "n": "!!!", "e": "AQAB"})
        await asyncio.sleep(0.1)
        assert_ok(await ask(client, idp.token("ec-1")))
        await asyncio.sleep(0.1)  # the background refresh has the new set
        assert_unauthorized(await ask(client, unknown_kid_token("broken")))
