"""``python -m app serve`` end to end: migrate, uvicorn (uvloop + httptools), the printed token
and curl line work as printed, logs are JSON, SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from app.settings import PROJECT_ROOT
from app.store import PostgresStore
from tests.chatkit_client import parse_sse


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_serve_prints_a_working_curl(
    database_url: str, tmp_path: Path, store: PostgresStore
) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "PRODUCTION"))}
    env |= {
        "DATABASE_URL": database_url,
        "DATA_DIR": str(tmp_path),
        "PORT": str(port),
        "OFFLINE_WORD_DELAY_SECONDS": "0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "serve",
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        printed: list[str] = []
        while not any("curl -N" in line for line in printed):
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line, "serve exited before printing its curl line"
            printed.append(line.decode())
        token = next(line for line in printed if "export TOKEN=" in line).split("TOKEN=")[1].strip()
        curl = shlex.split(next(line for line in printed if "curl -N" in line))
        url = curl[2]
        assert url == f"http://127.0.0.1:{port}/chatkit"
        assert curl[curl.index("-H") + 1] == "Authorization: Bearer $TOKEN"
        body = curl[curl.index("-d") + 1]

        async with httpx.AsyncClient(timeout=30) as http:
            for _ in range(600):
                try:
                    if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            response = await http.post(
                url,
                content=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
        assert response.status_code == 200
        events = parse_sse(response.text)
        done = [e["item"] for e in events if e["type"] == "thread.item.done"]
        assert [i["type"] for i in done] == ["user_message", "assistant_message"]
        assert "offline demo model" in done[1]["content"][0]["text"]
        assert (await store.load_threads(10, None, "desc", {"user_id": "dev"})).data
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
    assert process.returncode in (0, -signal.SIGTERM)
    stderr = (await process.stderr.read()).decode()
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(r["msg"] == "chatkit-pg ready" for r in records), stderr[-2000:]
    access = [r for r in records if r.get("path") == "/chatkit"]
    assert access and access[0]["user_id"] == "dev" and access[0]["status"] == 200
    assert "Hello! What can you do?" not in stderr  # no message text in the logs
