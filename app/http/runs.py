"""The routes of resumable replies (docs/runs.md), under ``CHATKIT_PATH``:

* ``GET  {CHATKIT_PATH}/runs/{run_id}/events``: the run's events after ``Last-Event-ID:
  <run_id>:<seq>`` (or ``?after=<seq>``; from the first without either), then live until the
  run ends, from any process (app.chat.runs);
* ``POST {CHATKIT_PATH}/runs/{run_id}/cancel``: stop the run wherever it runs (202);
* ``GET  {CHATKIT_PATH}/threads/{thread_id}/run``: the thread's running run, ``{"run_id",
  "seq"}`` (its last logged event), or 404: what a reloaded page asks to bring a reply that
  outlived its connection into view when it ends (frontend/src/runs.ts).

All three authenticate like ``POST /chatkit`` and count against the user's request budget. Another
user's run, a run that never existed and one that ended longer ago than
``RUN_EVENTS_RETENTION_SECONDS`` all answer the same 404; a malformed resume point is a 400.
A resumer only reads: it cannot make the log grow, and its stream ends when the run does.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterable, AsyncIterator
from functools import partial

from chatkit.store import NotFoundError
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.background import TaskRegistry
from app.chat.run_recovery import store_lost_reply
from app.chat.runs import RunOptions, RunRegistry, split_events
from app.chat.server import ChatKitPgServer
from app.chat.stream_events import error_chunk
from app.context import RunClaim
from app.errors import InvalidInputError
from app.http.runtime import Runtime
from app.http.sse import EventPump, SSEResponse
from app.observability import Metrics, Stopwatch, user_id_var
from app.pg.pool import ConnectionPool
from app.pg.runlog import RunLog
from app.settings import Settings

log = logging.getLogger(__name__)

RESUMABLE_HEADER = "x-chatkit-resumable"
RUN_HEADER = "X-Chatkit-Run"
_RUN_ID = re.compile(r"run_[0-9a-f]{32}")
_SEQ = re.compile(r"[0-9]{1,10}")
_THREAD_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
THREAD_CREATED = b'"thread.created"'
MAX_SEQ = 2**31 - 1


def wants_resumable(request: Request) -> bool:
    """Whether a streaming request opted in (``X-Chatkit-Resumable: true``)."""
    return request.headers.get(RESUMABLE_HEADER, "").strip().lower() == "true"


def parse_seq(value: str, field: str) -> int:
    if not _SEQ.fullmatch(value) or int(value) > MAX_SEQ:
        raise InvalidInputError("A resume point is a sequence number.", field=field)
    return int(value)


def resume_point(request: Request, run_id: str) -> int:
    """The seq after which to resume: ``Last-Event-ID`` (``<run_id>:<seq>``, this run's),
    else ``?after=``, else 0 (from the start). Anything malformed is a 400."""
    last = request.headers.get("last-event-id")
    if last is not None:
        run, sep, seq = last.strip().rpartition(":")
        if not sep or run != run_id:
            raise InvalidInputError(
                "Last-Event-ID must be <run_id>:<seq> of this run.", field="Last-Event-ID"
            )
        return parse_seq(seq, "Last-Event-ID")
    after = request.query_params.getlist("after")
    if len(after) > 1:
        raise InvalidInputError("after may be given once.", field="after")
    return parse_seq(after[0], "after") if after else 0


async def _user(request: Request) -> tuple[Runtime, RunRegistry, str]:
    runtime: Runtime = request.app.state.runtime
    user_id = await runtime.verifier.authenticate(request.headers.get("authorization"))
    user_id_var.set(user_id)
    if runtime.limits is not None:
        await runtime.limits.admit(user_id)
    runs = runtime.runs
    if runs is None:
        raise NotFoundError("runs are not kept by this server")
    return runtime, runs, user_id


def _run_id(request: Request) -> str:
    run_id = str(request.path_params["run_id"])
    if not _RUN_ID.fullmatch(run_id):
        raise NotFoundError("no such run")  # names nothing: as a missing run
    return run_id


async def run_events(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    if runtime.drain is not None:
        runtime.drain.check()  # shutting down: the client resumes through another replica
    runtime, runs, user_id = await _user(request)
    run_id = _run_id(request)
    after = resume_point(request, run_id)
    source = await runs.open(user_id, run_id, after)
    if source is None:
        raise NotFoundError("no such run")
    if runtime.limits is not None:
        # A resumer holds a stream lease like a reply: MAX_STREAMS_PER_USER bounds them,
        # across every replica (a 429 beyond it).
        lease = await runtime.limits.lease(user_id, None)
        source = lease.hold(source)
    return event_stream(runtime, run_id, source)


def event_stream(runtime: Runtime, run_id: str, source: AsyncIterable[bytes]) -> Response:
    """A run's events as SSE (heartbeats, cuts of readers that stop reading: app.http.sse);
    a reader going away stops only its own reading. A failure reading the log (the database
    unavailable) drops the connection rather than ending it with an error event: the run is not
    over, and its client resumes from the last event it has (docs/runs.md)."""
    settings = runtime.settings
    pump = EventPump(
        source,
        tasks=runtime.tasks,
        heartbeat_seconds=settings.sse_heartbeat_seconds,
        error_chunk=None,
        max_buffered_bytes=settings.stream_buffer_bytes,
    )
    drain = runtime.drain
    if drain is not None:
        drain.follow(pump)  # cut at SIGTERM: its client resumes elsewhere

    def on_close(outcome: str) -> None:
        if drain is not None:
            drain.followers.discard(pump)

    return SSEResponse(
        pump,
        stall_seconds=settings.stream_stall_seconds,
        on_close=on_close,
        headers={RUN_HEADER: run_id},
    )


async def cancel_run(request: Request) -> Response:
    _, runs, user_id = await _user(request)
    run_id = _run_id(request)
    if not await runs.cancel(user_id, run_id):
        raise NotFoundError("no such run")
    return JSONResponse({"run_id": run_id, "cancel": "requested"}, status_code=202)


async def thread_run(request: Request) -> Response:
    """The thread's running run and its last logged seq (one indexed read), or 404: no run
    going, no such thread, or another user's thread, alike."""
    _, runs, user_id = await _user(request)
    thread_id = str(request.path_params["thread_id"])
    if not _THREAD_ID.fullmatch(thread_id):
        raise NotFoundError("no run going")
    found = await runs.runlog.of_thread(user_id, thread_id)
    if found is None:
        raise NotFoundError("no run going")
    run_id, seq = found
    return JSONResponse({"run_id": run_id, "seq": seq}, headers={"Cache-Control": "no-store"})


def install(app: FastAPI, chatkit_path: str) -> None:
    """The three routes, as plain Starlette routes (like ``POST /chatkit``)."""
    base = chatkit_path.rstrip("/")
    app.add_route(f"{base}/runs/{{run_id}}/events", run_events, methods=["GET"])
    app.add_route(f"{base}/runs/{{run_id}}/cancel", cancel_run, methods=["POST"])
    app.add_route(f"{base}/threads/{{thread_id}}/run", thread_run, methods=["GET"])


def created_thread(chunk: bytes) -> str | None:
    """The id in a ``thread.created`` event of this chunk of the SDK's stream, if any."""
    for block in split_events(chunk):
        if THREAD_CREATED not in block:
            continue
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                try:
                    event = json.loads(line[5:])
                    if event.get("type") == "thread.created":
                        return str(event["thread"]["id"])
                except (ValueError, KeyError, TypeError, AttributeError):
                    return None
    return None


async def recording_thread(
    source: AsyncIterable[bytes], runlog: RunLog, user_id: str, run_id: str
) -> AsyncIterator[bytes]:
    """``source``, recording in the run's row the thread a ``threads.create`` reply makes
    (its first event) before that event goes out: a client that has it and reloads finds the
    run through ``GET .../threads/{id}/run``."""
    looking = True  # the SDK's first chunk starts with thread.created; later ones never do
    async for chunk in source:
        if looking:
            looking = False
            thread_id = created_thread(chunk)
            if thread_id is not None:
                try:
                    await runlog.set_thread(user_id, run_id, thread_id)
                except Exception as exc:  # the reply goes on; only the lookup misses it
                    log.warning("run's thread not recorded", extra={"reason": type(exc).__name__})
        yield chunk


def resumable_runs(request: Request) -> RunRegistry | None:
    """The registry when this streaming request opted in and the server keeps runs."""
    if not wants_resumable(request):
        return None
    runtime: Runtime = request.app.state.runtime
    return runtime.runs


def start_run(
    runtime: Runtime,
    runs: RunRegistry,
    run_id: str,
    user_id: str,
    source: AsyncIterable[bytes],
    op: str,
    claim: RunClaim | None = None,
) -> Response:
    """Detach the reply from this connection (it runs to its end, holding its stream slot and
    lease until then) and answer with the run's events from the first, each with its id."""
    metrics = runtime.metrics
    watch = Stopwatch()
    metrics.active_streams.inc()

    def on_end(state: str) -> None:
        metrics.active_streams.dec()
        runtime.open_streams -= 1
        metrics.stream_seconds.labels(op, state).observe(watch.seconds)
        log.info("run ended", extra={"outcome": state, "duration_ms": watch.ms})

    if op == "threads.create":  # the run's row learns the new thread's id
        source = recording_thread(source, runs.runlog, user_id, run_id)
    run = runs.launch(run_id, user_id, source, error_chunk, on_end, claim)
    return event_stream(runtime, run_id, run.follow(0))


def build_registry(
    pool: ConnectionPool,
    tasks: TaskRegistry,
    settings: Settings,
    server: ChatKitPgServer,
    metrics: Metrics | None = None,
    log_pool: ConnectionPool | None = None,
) -> RunRegistry:
    """This process's registry of resumable replies, from the settings; ``server`` stores the
    partial reply of a run whose process died (app.chat.run_recovery); ``log_pool`` carries
    the log's appends and reads (app.pg.runlog), else ``pool`` does."""
    options = RunOptions(
        flush_seconds=settings.run_flush_seconds,
        flush_events=settings.run_flush_events,
        heartbeat_seconds=settings.run_heartbeat_seconds,
        dead_after_seconds=settings.run_dead_after_seconds,
        poll_seconds=settings.run_poll_seconds,
        max_seconds=settings.run_max_seconds,
    )
    runlog = RunLog(
        pool, retention_seconds=settings.run_events_retention_seconds, log_pool=log_pool
    )
    return RunRegistry(runlog, tasks, options, partial(store_lost_reply, server), metrics)
