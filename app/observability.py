"""JSON logs that carry the request's ids (never message text) and the Prometheus metrics."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
user_id_var: ContextVar[str | None] = ContextVar("user_id", default=None)
thread_id_var: ContextVar[str | None] = ContextVar("thread_id", default=None)
op_var: ContextVar[str | None] = ContextVar("op", default=None)

_CONTEXT_VARS = {
    "request_id": request_id_var,
    "user_id": user_id_var,
    "thread_id": thread_id_var,
    "op": op_var,
}

# Extra fields a log call may attach with ``extra={...}``; anything else is dropped so that
# no call site can leak message text into the logs by accident.
EXTRA_FIELDS = (
    "method",
    "path",
    "status",
    "duration_ms",
    "outcome",
    "events",
    "client",
    "reason",
    "url",
    "kind",
    "model",
    "count",
)


_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)  # built once, not per line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request ids, allowed extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, var in _CONTEXT_VARS.items():
            value = getattr(record, name, None) or var.get()
            if value:
                entry[name] = value
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


class StartupTracebackFilter(logging.Filter):
    """Drops the traceback uvicorn logs when the lifespan stops on a configuration mistake:
    the lifespan has already logged it as one line naming the setting."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "uvicorn.error":
            return True
        text = record.getMessage()
        return not (text.startswith("Traceback") and "ConfigurationError: " in text)


def configure_logging(level: str, *, force: bool = False) -> None:
    """Route every logger (uvicorn's too) through one JSON handler on stderr.

    Without ``force`` an already configured root logger (pytest's, an embedding app's) is kept.
    """
    root = logging.getLogger()
    root.setLevel(level)
    if root.handlers and not force:
        return
    # Our lines carry none of the caller's file and line, thread or process: not computing them
    # (a walk up the stack and three lookups per record) is the logging HOWTO's own advice for
    # a hot path, and the access line is written for every request.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(StartupTracebackFilter())
    root.handlers = [handler]
    # chatkit's logger adds a plain-text handler of its own when LOG_LEVEL is set (our
    # variable too), which would write each of its lines twice, once not as JSON.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "chatkit"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    # Our middleware logs each request once, with its ids; uvicorn's access log would repeat it.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "chatkit_requests_total",
            "ChatKit requests by operation and HTTP status.",
            ["op", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "chatkit_request_duration_seconds",
            "Time to answer non-streaming ChatKit requests.",
            ["op"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.stream_seconds = Histogram(
            "chatkit_stream_duration_seconds",
            "Duration of streamed ChatKit responses by operation and outcome.",
            ["op", "outcome"],
            registry=self.registry,
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
        )
        self.active_streams = Gauge(
            "chatkit_active_streams",
            "Streams currently open.",
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "chatkit_store_call_duration_seconds",
            "Latency of store calls by method.",
            ["method"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )

        # Resumable replies (app.chat.runs, docs/runs.md).
        self.runs_running = Gauge(
            "chatkit_runs_running",
            "Resumable replies running in this process.",
            registry=self.registry,
        )
        self.runs_detached = Gauge(
            "chatkit_runs_detached",
            "Resumable replies running in this process that no client of this process follows.",
            registry=self.registry,
        )
        self.run_resumes = Counter(
            "chatkit_run_resumes_total",
            "Resumes served, by where the events came from (local: this process runs the reply; "
            "log: read from PostgreSQL).",
            ["source"],
            registry=self.registry,
        )
        self.runs_ended = Counter(
            "chatkit_runs_ended_total",
            "Resumable replies ended, by state (completed, cancelled, failed; lost: counted "
            "by the process that declared it lost).",
            ["state"],
            registry=self.registry,
        )
        self.run_log_batch_events = Histogram(
            "chatkit_run_log_batch_events",
            "Events per write of the run log (0: a heartbeat).",
            registry=self.registry,
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.draining = Gauge(
            "chatkit_draining",
            "1 once this process has received SIGTERM and refuses new work.",
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Stopwatch:
    __slots__ = ("start",)

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def ms(self) -> float:
        return round(self.seconds * 1000, 2)
