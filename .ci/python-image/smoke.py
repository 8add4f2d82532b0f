"""`make run` as a newcomer uses it: it serves, `/healthz` answers, the printed token streams a
reply from the offline model, and SIGTERM stops the server and the embedded PostgreSQL it
started. Standard library only; exits non-zero with the reason (and the server's output)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIDFILE = ROOT / ".data" / "postgres" / "postmaster.pid"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    port = free_port()
    env = os.environ | {"PORT": str(port), "OFFLINE_WORD_DELAY_SECONDS": "0"}
    proc = subprocess.Popen(
        ["make", "run"],  # noqa: S607
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("make run did not answer /healthz")
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=5) as reply:  # noqa: S310
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        token = next(line for line in output if "export TOKEN=" in line).split("TOKEN=")[1]
        body = {
            "type": "threads.create",
            "params": {"input": {"content": [{"type": "input_text", "text": "Hello"}],
                                 "attachments": [], "inference_options": {}}},
        }  # fmt: skip
        request = urllib.request.Request(  # noqa: S310
            f"{base}/chatkit",
            data=json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {token.strip()}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=60) as reply:  # noqa: S310
            assert reply.headers["Content-Type"].startswith("text/event-stream"), reply.headers
            events = [
                json.loads(line[6:]) for line in reply.read().decode().splitlines()
                if line.startswith("data: ")
            ]  # fmt: skip
        done = [e["item"] for e in events if e["type"] == "thread.item.done"]
        assert [i["type"] for i in done] == ["user_message", "assistant_message"], events
        assert "offline demo model" in done[1]["content"][0]["text"], done[1]
        assert PIDFILE.exists(), "no embedded PostgreSQL in .data/postgres"
        print(f"make run: /healthz 200, a streamed reply of {len(events)} events", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make and the server; PostgreSQL has its own session
        proc.wait(60)
    deadline = time.monotonic() + 60
    while PIDFILE.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if PIDFILE.exists():
        print("".join(output)[-4000:], file=sys.stderr)
        raise SystemExit("SIGTERM left the embedded PostgreSQL running")
    print("make run: SIGTERM stopped the server and its embedded PostgreSQL", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
