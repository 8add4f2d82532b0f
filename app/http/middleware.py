"""Per-request bookkeeping as plain ASGI middleware (it never buffers or wraps a stream):
a request id (``X-Request-ID``), the log context, one JSON access-log line, request metrics."""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability import (
    Metrics,
    Stopwatch,
    op_var,
    request_id_var,
    thread_id_var,
    user_id_var,
)

log = logging.getLogger("app.access")

SCOPE_KEY = "chatkit_pg.request"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass
class RequestInfo:
    request_id: str
    op: str | None = None
    streaming: bool = False


def request_info(scope: Scope) -> RequestInfo | None:
    info = scope.get(SCOPE_KEY)
    return info if isinstance(info, RequestInfo) else None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, chatkit_path: str) -> None:
        self.app = app
        self.metrics = metrics
        self.chatkit_path = chatkit_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _CLIENT_REQUEST_ID.fullmatch(candidate):
                    request_id = candidate
                break
        info = RequestInfo(request_id)
        scope[SCOPE_KEY] = info
        request_id_var.set(request_id)
        user_id_var.set(None)
        thread_id_var.set(None)
        op_var.set(None)

        status = 500
        watch = Stopwatch()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            if path == self.chatkit_path and scope.get("method") == "POST":
                op = info.op or "unknown"
                self.metrics.requests.labels(op, str(status)).inc()
                if not info.streaming:
                    self.metrics.request_seconds.labels(op).observe(watch.seconds)
            if path not in ("/healthz", "/readyz", "/metrics") or status >= 400:
                log.info(
                    "request",
                    extra={
                        "method": scope.get("method"),
                        "path": path,
                        "status": status,
                        "duration_ms": watch.ms,
                        "op": info.op,
                    },
                )
