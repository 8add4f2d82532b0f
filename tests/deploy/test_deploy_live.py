"""The deployment, live: the repository's nginx templates in a real nginx, in front of the real
app under uvicorn (uvloop, httptools, --proxy-headers), with a model that paces its reply, over
HTTPS and HTTP/2 on loopback ports; and a real headless Chromium (Playwright) reading the stream.

nginx and Chromium are real components: when one is missing these tests skip, except in CI (the
CI variable set), where they fail: .ci/run installs both from Debian.

"nginx does not buffer the stream" is proved in lockstep (``deployharness.Lockstep``): the model
emits each delta only once the client has acknowledged the one before, so through nginx every
delta is acknowledged in time however loaded the machine is, and through a buffering proxy the
first one never is. No assertion here rests on a timing margin; latencies and gaps are
measured by ``bench/deploy_bench.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import urllib.parse
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness.browser import chromium_browser
from tests.harness.deploy import (
    GZIP_EVERYTHING,
    Backend,
    Lockstep,
    Nginx,
    StreamResult,
    bearer_token,
    find_nginx,
    pace_prompt,
    read_stream,
    require,
    threads_create_body,
)
from tests.harness.pacedmodel import DELTA_MARK

DELTAS = 20
# How long the model waits, for the whole reply, for the client's acknowledgements. Generous:
# it is reached only when they never come (a proxy holding the stream back).
LOCKSTEP_WAIT_SECONDS = 60
# The controls' proxies hold delta 0 until the response has ended, however long the model waits
# (they also assert it), so a short wait there only keeps them quick.
CONTROL_WAIT_SECONDS = 3
HEARTBEAT_SECONDS = 0.2
READ_TIMEOUT_SECONDS = 2  # nginx's proxy_read_timeout here: low, so silence is cut quickly
NGINX_READ_TIMEOUT = f"{READ_TIMEOUT_SECONDS}s"
SILENCE_SECONDS = 2.25 * READ_TIMEOUT_SECONDS  # how long the model says nothing
# Below the app's own limits, so a 413 can only be nginx's; small enough that an over-limit
# body still fits in one HTTP/2 flow-control window (httpx sends the whole body before it reads
# the response, so over HTTP/2 a bigger one would wait for window updates that never come).
NGINX_MAX_BODY = 16 * 1024
NGINX_MAX_UPLOAD = 32 * 1024


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    return str(require(find_nginx(), "nginx", "apt-get install nginx"))


@pytest.fixture(scope="module")
def backend(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, nginx_binary: str
) -> Iterator[Backend]:
    server = Backend(database_url=database_url, heartbeat_seconds=HEARTBEAT_SECONDS)
    server.start(tmp_path_factory.mktemp("backend") / "uvicorn.log")
    yield server
    server.stop()


def start_nginx(prefix: Path, backend: Backend, **options: object) -> Nginx:
    defaults: dict[str, object] = {
        "read_timeout": NGINX_READ_TIMEOUT,
        "max_body_bytes": NGINX_MAX_BODY,
        "max_upload_bytes": NGINX_MAX_UPLOAD,
    }
    defaults.update(options)
    return Nginx(prefix=prefix, upstream=f"127.0.0.1:{backend.port}", **defaults).start()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def edge(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    nginx = start_nginx(tmp_path_factory.mktemp("nginx"), backend)
    yield nginx
    nginx.stop()


@pytest.fixture(scope="module")
def edge_gzip(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """The same templates under an http block that gzips everything, SSE included."""
    nginx = start_nginx(tmp_path_factory.mktemp("nginx-gzip"), backend, http_extra=GZIP_EVERYTHING)
    yield nginx
    nginx.stop()


def client(http2: bool = True) -> httpx.AsyncClient:
    # Deadlines only (a loaded machine must not fail a test); heartbeats keep a live stream busy.
    return httpx.AsyncClient(verify=False, http2=http2, timeout=httpx.Timeout(90, connect=30))


async def paced_stream(base_url: str, *, http2: bool = True, **pace: float) -> StreamResult:
    async with client(http2) as http:
        return await read_stream(
            http, f"{base_url}/chatkit", threads_create_body(pace_prompt(**pace)), bearer_token()
        )


async def lockstep_stream(
    base_url: str, acks: Path, *, http2: bool = True, wait_seconds: float = LOCKSTEP_WAIT_SECONDS
) -> StreamResult:
    """A ``DELTAS``-delta reply in lockstep with this client (acknowledgements in ``acks``)."""
    lockstep = Lockstep(acks, wait_seconds)
    prompt = pace_prompt(DELTAS, interval_ms=0, lockstep=lockstep)
    async with client(http2) as http:
        return await read_stream(
            http, f"{base_url}/chatkit", threads_create_body(prompt), bearer_token(), lockstep
        )


def assert_complete_stream(result: StreamResult, deltas: int) -> None:
    assert result.status == 200, result.events
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.body_error is None, result.body_error
    assert [e.index for e in result.deltas] == list(range(deltas)), "every delta, in order"
    kinds = [e.kind for e in result.events]
    assert kinds[0] == "thread.created"
    done = [e for e in result.events if e.kind == "thread.item.done" and e.data]
    assert any(e.data["item"]["type"] == "assistant_message" for e in done), kinds  # type: ignore[index]


def assert_unbuffered(result: StreamResult, deltas: int = DELTAS) -> None:
    """Each delta was in the client's hands before the model produced the next one.

    The model emitted delta i+1 only after the client's acknowledgement of delta i, and wrote
    "acked" in it; a delta held back by a proxy cannot be acknowledged, and the model marks the
    next one "timeout" once its deadline has passed. Load only makes the exchange slower.
    """
    assert_complete_stream(result, deltas)
    got = result.deltas
    marks = [e.lockstep for e in got]
    assert marks == ["first"] + ["acked"] * (deltas - 1), marks
    # The same causal order, read on the system-wide monotonic clock of both processes: the
    # client had delta i before the model emitted delta i+1.
    for previous, current in itertools.pairwise(got):
        assert previous.arrived < (current.emitted or 0.0), (previous.index, current.index)


def assert_held_back(result: StreamResult, deltas: int = DELTAS) -> None:
    """For the controls: the proxy delivered the whole reply, but only once it had ended, so the
    lockstep check rejects it."""
    assert_complete_stream(result, deltas)  # everything arrives ...
    got = result.deltas
    assert got[1].lockstep == "timeout", "the model waited in vain for delta 0's acknowledgement"
    assert got[0].arrived > (got[-1].emitted or 0.0), "delta 0 came after the model's last delta"
    with pytest.raises(AssertionError):
        assert_unbuffered(result, deltas)  # ... but not as it was produced


# --- streaming through nginx ---------------------------------------------------------------------


async def test_stream_through_nginx_over_https_http2_is_unbuffered(
    edge: Nginx, tmp_path: Path
) -> None:
    result = await lockstep_stream(edge.https_url, tmp_path)
    assert result.http_version == "HTTP/2"
    assert_unbuffered(result)
    assert "content-encoding" not in result.headers


async def test_stream_over_http1_through_nginx_is_unbuffered_too(
    edge: Nginx, tmp_path: Path
) -> None:
    result = await lockstep_stream(edge.https_url, tmp_path, http2=False)
    assert result.http_version == "HTTP/1.1"
    assert_unbuffered(result)


async def test_stream_stays_unbuffered_and_uncompressed_with_gzip_on(
    edge_gzip: Nginx, tmp_path: Path
) -> None:
    # gzip really is on in this nginx: a JSON response from the app comes back compressed ...
    async with client() as http:
        health = await http.get(f"{edge_gzip.https_url}/readyz")
    assert health.headers.get("content-encoding") == "gzip"
    # ... but /chatkit's event stream does not.
    result = await lockstep_stream(edge_gzip.https_url, tmp_path)
    assert "content-encoding" not in result.headers
    assert_unbuffered(result)


async def test_without_gzip_off_the_stream_would_be_compressed(
    backend: Backend, tmp_path: Path
) -> None:
    """Control: the same templates minus `gzip off;` in /chatkit compress the event stream,
    so the gzip test above can fail. (Compressed, it is not held back: with proxy_buffering off
    nginx's gzip flushes after each read from upstream, so the lockstep would not catch this;
    the Content-Encoding check does.)"""
    nginx = Nginx(
        prefix=tmp_path,
        upstream=f"127.0.0.1:{backend.port}",
        http_extra=GZIP_EVERYTHING,
        read_timeout=NGINX_READ_TIMEOUT,
    )
    nginx.write_config()
    conf = nginx.prefix / "conf.d" / "default.conf"
    text = conf.read_text()
    assert "        gzip off;\n" in text
    conf.write_text(text.replace("        gzip off;\n", ""))
    nginx.start_rendered()
    try:
        result = await lockstep_stream(nginx.https_url, tmp_path / "acks")
    finally:
        nginx.stop()
    assert result.headers.get("content-encoding") == "gzip"
    assert_complete_stream(result, DELTAS)


# --- heartbeats against nginx's read timeout ---------------------------------------------------


async def test_silent_stream_outlives_nginx_read_timeout_thanks_to_heartbeats(
    edge: Nginx,
) -> None:
    lead = SILENCE_SECONDS
    result = await paced_stream(edge.https_url, deltas=3, interval_ms=50, lead_ms=lead * 1000)
    assert_complete_stream(result, 3)
    first = result.deltas[0]
    assert first.arrived - result.started >= lead * 0.9, "the model really was silent"
    # What kept nginx reading: heartbeats, relayed during the silence. Bridging it without ever
    # waiting a whole read timeout takes at least this many (a count no load can lower: nginx
    # would have cut the stream, as the control below shows).
    heartbeats = [e for e in result.comments if e.arrived < first.arrived]
    assert len(heartbeats) >= int(lead / READ_TIMEOUT_SECONDS), len(heartbeats)
    assert "upstream timed out" not in edge.error_log()


async def test_silent_stream_without_timely_heartbeats_is_cut_by_nginx(
    database_url: str, nginx_binary: str, tmp_path: Path
) -> None:
    """Control: a backend whose heartbeat is slower than nginx's read timeout loses the stream,
    so the test above is a real check of the heartbeat."""
    slow = Backend(database_url=database_url, heartbeat_seconds=30)
    slow.start(tmp_path / "uvicorn.log")
    nginx = start_nginx(tmp_path / "nginx", slow)
    try:
        result = await paced_stream(
            nginx.https_url, deltas=3, interval_ms=50, lead_ms=SILENCE_SECONDS * 1000
        )
    finally:
        nginx.stop()
        slow.stop()
    assert result.status == 200
    assert len(result.deltas) < 3 or result.body_error is not None
    assert "upstream timed out" in nginx.error_log()


# --- redirects, headers, TLS, static files ---------------------------------------------------------


async def test_http_redirects_to_https_except_acme_challenges(edge: Nginx) -> None:
    token_dir = edge.prefix / "acme" / ".well-known" / "acme-challenge"
    (token_dir / "probe-token").write_text("probe-token.key-authorization")
    async with httpx.AsyncClient(timeout=10) as http:
        redirected = await http.post(f"{edge.http_url}/chatkit?x=1", content=b"{}")
        page = await http.get(f"{edge.http_url}/")
        acme = await http.get(f"{edge.http_url}/.well-known/acme-challenge/probe-token")
    assert redirected.status_code == 301
    assert redirected.headers["location"] == f"https://localhost:{edge.https_port}/chatkit?x=1"
    assert page.status_code == 301
    assert acme.status_code == 200 and acme.text == "probe-token.key-authorization"


SECURITY_HEADERS = {
    "strict-transport-security": "max-age=63072000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "strict-origin-when-cross-origin",
}


async def test_security_headers_on_app_static_and_error_responses(edge: Nginx) -> None:
    async with client() as http:
        responses = {
            "app": await http.get(f"{edge.https_url}/healthz"),
            "static": await http.get(f"{edge.https_url}/"),
            "spa-fallback": await http.get(f"{edge.https_url}/some/client/route"),
            "metrics-hidden": await http.get(f"{edge.https_url}/metrics"),
            "unauthenticated": await http.post(f"{edge.https_url}/chatkit", content=b"{}"),
        }
    assert responses["app"].json() == {"status": "ok"}
    assert "chatkit-pg SSE probe" in responses["static"].text
    assert "chatkit-pg SSE probe" in responses["spa-fallback"].text
    assert responses["metrics-hidden"].status_code == 404
    assert responses["unauthenticated"].status_code == 401
    for name, response in responses.items():
        assert response.http_version == "HTTP/2", name
        for header, value in SECURITY_HEADERS.items():
            assert response.headers.get(header) == value, (name, header)
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers.get("server") == "nginx", "server_tokens off: no version"


@pytest.mark.parametrize(
    ("version", "accepted"),
    [
        (ssl.TLSVersion.TLSv1, False),
        (ssl.TLSVersion.TLSv1_1, False),
        (ssl.TLSVersion.TLSv1_2, True),
        (ssl.TLSVersion.TLSv1_3, True),
    ],
    ids=["tls1.0", "tls1.1", "tls1.2", "tls1.3"],
)
async def test_only_tls12_and_tls13_with_h2_alpn(
    edge: Nginx, version: ssl.TLSVersion, accepted: bool
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("ALL:@SECLEVEL=0")  # let the client offer old versions at all
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # offering them is the point
            context.minimum_version = version
            context.maximum_version = version
    except (ValueError, ssl.SSLError):
        pytest.skip(f"this OpenSSL cannot offer {version.name}")
    context.set_alpn_protocols(["h2", "http/1.1"])
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", edge.https_port, ssl=context, server_hostname="localhost"
        )
    except ssl.SSLError as exc:
        assert not accepted, exc
        assert "PROTOCOL_VERSION" in str(exc).upper() or "UNSUPPORTED" in str(exc).upper(), exc
        return
    tls = writer.get_extra_info("ssl_object")
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    assert accepted, f"nginx accepted {tls.version()}"
    assert tls.selected_alpn_protocol() == "h2"


# --- limits ------------------------------------------------------------------------------------


def assert_nginx_413(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text[:200]
    assert response.headers["content-type"].startswith("text/html"), "the app answers JSON"
    assert "413 Request Entity Too Large" in response.text
    assert response.headers.get("strict-transport-security"), "headers on errors too"


@pytest.mark.parametrize("http2", [True, False], ids=["h2", "http1.1"])
async def test_bodies_over_the_limit_get_413_from_nginx(edge: Nginx, http2: bool) -> None:
    auth = {"Authorization": f"Bearer {bearer_token()}", "Content-Type": "application/json"}
    near = b'{"type": "x", "pad": "' + b"a" * (NGINX_MAX_BODY - 100) + b'"}'
    over = b'{"type": "x", "pad": "' + b"a" * (NGINX_MAX_BODY + 10) + b'"}'

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        """No Content-Length: nginx must count the bytes as they come."""
        for start in range(0, len(data), 4096):
            yield data[start : start + 4096]

    async with client(http2) as http:
        under_limit = await http.post(f"{edge.https_url}/chatkit", content=near, headers=auth)
        declared = await http.post(f"{edge.https_url}/chatkit", content=over, headers=auth)
        streamed = await http.post(f"{edge.https_url}/chatkit", content=chunked(over), headers=auth)
        upload = await http.post(
            f"{edge.https_url}/files",
            files={"file": ("big.txt", b"x" * (NGINX_MAX_UPLOAD + 1), "text/plain")},
            headers={"Authorization": auth["Authorization"]},
        )
    # Just under nginx's limit the body reaches the app, which rejects the request type (JSON).
    assert under_limit.status_code == 400
    assert under_limit.json()["error"]["code"] == "invalid_request"
    assert_nginx_413(declared)
    assert_nginx_413(streamed)
    assert_nginx_413(upload)


RATE_BURST = 3
# At one request a minute nothing refills during a test: limit_req with burst=N nodelay admits
# exactly N + 1 requests at once from an address and refuses every one after (no timing).
RATE_ONE_A_MINUTE = "1r/m"
EDGE_429 = {"error": {"code": "rate_limited", "message": "Too many requests. Please retry later."}}


def assert_edge_429(response: httpx.Response) -> None:
    """nginx's own 429: the app's kind of JSON error, one Retry-After, the security headers."""
    assert response.status_code == 429, response.text[:200]
    assert response.headers["content-type"] == "application/json"
    assert response.json() == EDGE_429
    assert response.headers.get_list("retry-after") == ["1"]
    assert response.headers.get("strict-transport-security"), "headers on errors too"
    assert response.headers.get("x-content-type-options") == "nosniff"


async def test_every_route_to_the_app_is_rate_limited_per_ip(
    backend: Backend, tmp_path: Path
) -> None:
    """Unauthenticated requests reach the app before anything checks them: bad tokens on
    /chatkit, uploads without one on /files, the probes and the JWKS. nginx limits each family
    by client address, on its own budget (spending ChatKit's leaves /files untouched); what
    nginx serves itself (the frontend) is not limited. Old template: the probes never were,
    and a refusal was nginx's HTML page without Retry-After."""
    nginx = start_nginx(tmp_path, backend, rate_limit=RATE_ONE_A_MINUTE, rate_burst=RATE_BURST)
    bad_token = {"Authorization": "Bearer not-a-token"}
    base = nginx.https_url
    tries = RATE_BURST + 4
    try:
        async with client() as http:
            chatkit = [
                await http.post(f"{base}/chatkit", json={"type": "threads.list"}, headers=bad_token)
                for _ in range(tries)
            ]
            files = [await http.post(f"{base}/files", content=b"x") for _ in range(tries)]
            public = [
                await http.get(f"{base}{path}")
                for path in ["/readyz", "/healthz", "/.well-known/jwks.json"] * 3
            ]
            static = [await http.get(f"{base}/") for _ in range(tries)]
    finally:
        nginx.stop()
    admitted = RATE_BURST + 1
    for family, answers, status in (
        ("/chatkit with a bad token", chatkit, 401),
        ("/files without a token", files, 401),
    ):
        assert [r.status_code for r in answers] == [status] * admitted + [429] * (
            tries - admitted
        ), family
        for refused in answers[admitted:]:
            assert_edge_429(refused)
    # The app's own answers pass through untouched: its JSON, and no Retry-After added.
    assert chatkit[0].json()["error"]["code"] == "unauthorized"
    assert "retry-after" not in chatkit[0].headers
    assert [r.status_code for r in public[:admitted]] == [200] * admitted
    for refused in public[admitted:]:
        assert_edge_429(refused)
    assert {r.status_code for r in static} == {200}
    assert "limiting requests" in nginx.error_log()  # logged at warn


async def test_the_apps_own_429_passes_through_nginx_unchanged(
    tmp_path: Path, nginx_binary: str
) -> None:
    """Retry-After is added to nginx's own 429s only: an upstream 429 keeps its single
    header and its body. The upstream here is a one-answer HTTP server, so that its 429 is
    certain (the app's per-user limits have their own tests)."""
    body = b'{"error": {"code": "rate_limited", "message": "app"}}'

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
            b"Retry-After: 7\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    nginx = Nginx(prefix=tmp_path, upstream=f"127.0.0.1:{port}").start()
    try:
        async with client() as http:
            response = await http.post(f"{nginx.https_url}/chatkit", content=b"{}")
    finally:
        nginx.stop()
        upstream.close()
        await upstream.wait_closed()
    assert response.status_code == 429
    assert response.content == body
    assert response.headers.get_list("retry-after") == ["7"]


# --- a real browser ------------------------------------------------------------------------------


async def test_headless_chromium_reads_the_stream_as_it_is_produced(
    edge: Nginx, tmp_path: Path
) -> None:
    """The page hands every delta to ``window.__ack`` as soon as it has read it (a Playwright
    binding that acknowledges it), so the lockstep reply completes only if Chromium got each
    delta before the model produced the next."""
    lockstep = Lockstep(tmp_path, LOCKSTEP_WAIT_SECONDS)
    fragment = urllib.parse.urlencode(
        {
            "token": bearer_token("browser-user"),
            "prompt": pace_prompt(DELTAS, interval_ms=0, lockstep=lockstep),
        }
    )
    async with chromium_browser() as browser:
        context = await browser.new_context(ignore_https_errors=True)
        page = await context.new_page()
        await page.expose_function("__ack", lockstep.ack_delta)
        await page.goto(f"{edge.https_url}/#{fragment}")
        await page.wait_for_function("() => window.__result !== undefined", timeout=180_000)
        result = await page.evaluate("() => window.__result")
    assert result["error"] is None, result["error"]
    assert result["status"] == 200
    assert result["contentType"].startswith("text/event-stream")
    assert result["protocol"] == "h2"

    marks = [DELTA_MARK.search(e["delta"]) for e in result["events"] if e["delta"]]
    got = [m for m in marks if m]
    assert [int(m.group(1)) for m in got] == list(range(DELTAS)), "every delta, in order"
    assert [m.group(3) for m in got] == ["first"] + ["acked"] * (DELTAS - 1), "as produced"
    assert any(e["type"] == "thread.item.done" for e in result["events"][-3:])


async def test_a_buffering_proxy_fails_the_unbuffered_check(
    backend: Backend, tmp_path: Path
) -> None:
    """Control: the same templates with buffering forced on (and the app's X-Accel-Buffering
    ignored) hold the events back over HTTP/1.1 until the stream ends, and the check used
    above rejects the result. (nginx 1.22's HTTP/2 output happens to flush each read even
    when buffering; with gzip on as well it holds everything back on both protocols.)"""
    nginx = Nginx(prefix=tmp_path, upstream=f"127.0.0.1:{backend.port}")
    nginx.write_config()
    conf = nginx.prefix / "conf.d" / "default.conf"
    text = conf.read_text()
    assert text.count("        proxy_buffering off;\n") == 2
    conf.write_text(
        text.replace(
            "        proxy_buffering off;\n",
            "        proxy_buffering on;\n        proxy_ignore_headers X-Accel-Buffering;\n",
        )
    )
    nginx.start_rendered()
    try:
        result = await lockstep_stream(
            nginx.https_url, tmp_path / "acks", http2=False, wait_seconds=CONTROL_WAIT_SECONDS
        )
    finally:
        nginx.stop()
    assert_held_back(result)
