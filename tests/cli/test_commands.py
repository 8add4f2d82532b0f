"""``python -m app serve`` end to end: migrate, uvicorn (uvloop + httptools), the printed token
and curl line work as printed, logs are JSON, SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from app.pg.store import PostgresStore
from app.settings import PROJECT_ROOT
from tests.harness.chatkit_client import parse_sse


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
    assert process.returncode == 0  # SIGTERM is an orderly stop
    stderr = (await process.stderr.read()).decode()
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(r["msg"] == "chatkit-pg ready" for r in records), stderr[-2000:]
    access = [r for r in records if r.get("path") == "/chatkit"]
    assert access and access[0]["user_id"] == "dev" and access[0]["status"] == 200
    assert "Hello! What can you do?" not in stderr  # no message text in the logs


def _alive_after(pid: int, seconds: float) -> bool:
    """Whether ``pid`` still runs (a zombie does not) after waiting up to ``seconds``: the
    postmaster removes its pid file a moment before it exits."""
    try:
        psutil.Process(pid).wait(seconds)
    except psutil.NoSuchProcess:
        return False
    except psutil.TimeoutExpired:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return False


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh checkout: no settings of the developer's own shell."""
    keep = {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT"}
    env = {k: v for k, v in os.environ.items() if k in keep}
    return env | {"DATA_DIR": str(tmp_path)} | extra


async def test_first_screen_of_serve_on_the_embedded_database(tmp_path: Path) -> None:
    """What a newcomer sees first: which embedded database runs where, the endpoint, the chat
    page, the token and the curl line; no library chatter (alembic's revision lines, driver
    warnings) before them. SIGTERM stops the server and the embedded PostgreSQL it started."""
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "serve",
        cwd=PROJECT_ROOT,
        env=_clean_env(tmp_path, PORT=str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        printed: list[str] = []
        while not any("curl -N" in line for line in printed):
            line = await asyncio.wait_for(process.stdout.readline(), 120)
            assert line, f"serve exited before printing its curl line: {printed}"
            printed.append(line.decode().rstrip("\n"))
        pid = int((tmp_path / "postgres" / "postmaster.pid").read_text().split("\n", 1)[0])
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0
    assert not (tmp_path / "postgres" / "postmaster.pid").exists(), "PostgreSQL left running"
    assert not _alive_after(pid, 30), "the postmaster is still running"
    assert re.fullmatch(
        rf"starting embedded PostgreSQL 1[5-9] \(.+\) in {re.escape(str(tmp_path / 'postgres'))}",
        printed[0],
    ), printed[0]
    assert printed[1] == f"chatkit-pg: ChatKit endpoint at http://127.0.0.1:{port}/chatkit"
    assert printed[2] == f"Chat page (development, this machine only): http://127.0.0.1:{port}/"
    assert printed[3].startswith('A token for user "dev"')
    assert printed[4].startswith("  export TOKEN=ey")
    assert printed[5] == "Create a thread and stream a reply:"
    assert printed[6].startswith(f"  curl -N http://127.0.0.1:{port}/chatkit ")
    assert len(printed) == 7, printed


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, "MODEL_NAME"),
        ({"PORT": "eighty"}, "PORT"),
        ({"DB_POOL_SIZE": "-3"}, "DB_POOL_SIZE"),
        ({"PRODUCTION": "true"}, "JWT_SECRET"),
        ({"AGENT_INSTRUCTIONS_FILE": "/nonexistent/prompt.md"}, "AGENT_INSTRUCTIONS_FILE"),
        ({"DATABASE_URL": "postgresql://postgres@127.0.0.1:9/none"}, "DATABASE_URL"),
    ],
)
def test_configuration_mistakes_are_one_line_and_exit_2(
    tmp_path: Path, settings: dict[str, str], named: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        cwd=PROJECT_ROOT,
        env=_clean_env(tmp_path, **settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chatkit-pg cannot start: ") and named in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_configuration_mistake_under_plain_uvicorn_is_one_log_line(tmp_path: Path) -> None:
    """The image starts `uvicorn app.main:create_app --factory` directly: a mistake found in
    the lifespan is one JSON error line naming the setting, without uvicorn's traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", "0"],
        cwd=PROJECT_ROOT,
        env=_clean_env(
            tmp_path,
            OPENAI_BASE_URL="http://127.0.0.1:9/v1",
            DATABASE_URL="postgresql://postgres@127.0.0.1:9/none",  # never reached
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    errors = [r for r in records if r["level"] == "ERROR" and "cannot start" in r["msg"]]
    assert len(errors) == 1 and "MODEL_NAME" in errors[0]["msg"], result.stderr
