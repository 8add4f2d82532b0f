"""Operations: health, readiness, metrics, CORS, request ids and the JSON logs."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from app.main import create_app
from app.observability import JsonFormatter
from app.settings import Settings
from tests.harness.chatkit_client import MakeClient
from tests.harness.pg import PgServer, migrate

ORIGIN = "https://chat.example.com"


async def test_health_and_readiness(make_client: MakeClient) -> None:
    client = await make_client()
    assert (await client.http.get("/healthz")).json() == {"status": "ok"}
    ready = await client.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "database": "ok", "schema": "ok"}


async def test_a_draining_process_is_not_ready_and_refuses_new_work(
    make_client: MakeClient,
) -> None:
    """What SIGTERM starts (app.http.drain; across real processes: tests/http/
    test_runs_restart.py): readiness fails at once and a ChatKit request is a 503 to retry."""
    client = await make_client()
    client.app.state.runtime.drain.begin()
    ready = await client.http.get("/readyz")
    assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
    refused = await client.post({"type": "threads.list", "params": {}})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "unavailable"
    assert "chatkit_draining 1.0" in (await client.http.get("/metrics")).text
    assert (await client.http.get("/healthz")).status_code == 200  # alive: not to be killed


@pytest.fixture
async def scratch_url(pg_server: PgServer) -> AsyncIterator[str]:
    url = await pg_server.create_database("ckpg_ready")
    yield url
    await pg_server.drop_database(url)


async def _ready(settings: Settings) -> httpx.Response:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.get("/healthz")).status_code == 200
            return await http.get("/readyz")


async def test_readiness_follows_the_schema(app_settings: Settings, scratch_url: str) -> None:
    settings = app_settings.model_copy(update={"database_url": scratch_url})
    missing = await _ready(settings)
    assert missing.status_code == 503 and missing.json()["schema"] == "missing"

    import asyncio

    await asyncio.to_thread(migrate, scratch_url)
    assert (await _ready(settings)).status_code == 200

    conn = await asyncpg.connect(PgServer.dsn(scratch_url))
    try:
        await conn.execute("UPDATE alembic_version SET version_num = 'an_older_revision'")
    finally:
        await conn.close()
    behind = await _ready(settings)
    assert behind.status_code == 503
    assert behind.json()["schema"] == "not at the latest migration"


async def test_unreachable_database_is_not_ready(app_settings: Settings) -> None:
    # Nothing connects at startup: the app starts and is alive, but not ready.
    url = "postgresql+asyncpg://nobody@127.0.0.1:1/none"
    response = await _ready(app_settings.model_copy(update={"database_url": url}))
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "database": "unreachable"}


async def test_metrics(make_client: MakeClient) -> None:
    client = await make_client()
    thread_id, _ = await client.create_thread("Hello")
    await client.call("threads.list", {})
    await client.call("items.list", {"thread_id": thread_id})
    await client.post({"type": "threads.list", "params": {}}, user=None)  # 401
    text = (await client.http.get("/metrics")).text
    for line in (
        'chatkit_requests_total{op="threads.create",status="200"} 1.0',
        'chatkit_requests_total{op="threads.list",status="200"} 1.0',
        'chatkit_requests_total{op="items.list",status="200"} 1.0',
        'chatkit_requests_total{op="unknown",status="401"} 1.0',
        'chatkit_stream_duration_seconds_count{op="threads.create",outcome="completed"} 1.0',
        'chatkit_request_duration_seconds_count{op="threads.list"} 1.0',
        "chatkit_active_streams 0.0",
    ):
        assert line in text, line
    assert 'chatkit_store_call_duration_seconds_count{method="add_thread_item"} 2.0' in text
    assert 'chatkit_store_call_duration_seconds_count{method="load_threads"} 1.0' in text


async def test_cors(make_client: MakeClient) -> None:
    client = await make_client(cors_origins=[ORIGIN])
    preflight = await client.http.options(
        client.path,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()

    other = await client.http.options(
        client.path,
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in other.headers

    # The browser can read answers, errors included.
    ok = await client.post({"type": "threads.list", "params": {}}, headers={"Origin": ORIGIN})
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    denied = await client.post(
        {"type": "threads.list", "params": {}}, user=None, headers={"Origin": ORIGIN}
    )
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == ORIGIN


async def test_request_id(make_client: MakeClient) -> None:
    client = await make_client()
    mine = await client.http.get("/healthz", headers={"X-Request-ID": "trace-42.a"})
    assert mine.headers["x-request-id"] == "trace-42.a"
    odd = await client.http.get("/healthz", headers={"X-Request-ID": "no spaces <allowed>"})
    assert odd.headers["x-request-id"] != "no spaces <allowed>"
    assert len(odd.headers["x-request-id"]) == 32


async def test_logs_carry_ids_but_never_message_text(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()
    caplog.set_level(logging.DEBUG)
    secret = "SECRET-MESSAGE-TEXT-4711"
    thread_id, _ = await client.create_thread(f"Please remember {secret}")
    await client.send(thread_id, f"And also {secret}")
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    assert lines
    assert all(secret not in json.dumps(line) for line in lines)

    access = [line for line in lines if line["logger"] == "app.access"]
    assert len(access) == 2
    first, second = access
    assert first["op"] == "threads.create" and first["user_id"] == "alice"
    assert first["status"] == 200 and len(first["request_id"]) == 32
    assert second["op"] == "threads.add_user_message" and second["thread_id"] == thread_id
    replies = [line for line in lines if line["msg"] == "reply finished"]
    assert [r["thread_id"] for r in replies] == [thread_id, thread_id]
    assert replies[0]["request_id"] == first["request_id"]
