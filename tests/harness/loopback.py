"""Real uvicorn servers on 127.0.0.1 inside the test's event loop (random free ports)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test runner owns the signals
        yield


def bound_socket() -> socket.socket:
    """A socket bound to a free loopback port (serve() listens on it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def serve(
    app: Any, *, lifespan: str = "on", sock: socket.socket | None = None
) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn (httptools) on a loopback port; yields its base URL.

    ``sock`` (from ``bound_socket()``) lets a test know the URL before the app is built."""
    sock = sock or bound_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan=lifespan,
        log_config=None,
        access_log=False,
        loop="asyncio",
        http="httptools",
        ws="none",
        timeout_graceful_shutdown=5,
        server_header=False,  # as deployed (Dockerfile, deploy/: --no-server-header)
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn exited before it started")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
