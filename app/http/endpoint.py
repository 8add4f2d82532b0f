"""``POST /chatkit``: authenticate, read and check the body, then hand it to the ChatKit server.

Order matters: the token is checked before a byte of the body is read; the body is bounded;
the request is parsed and checked (ownership of every thread and item it names) before any
response starts, so that all client mistakes are plain 4xx JSON answers and only failures of
the reply itself arrive as ChatKit ``error`` events inside the stream.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace

from chatkit.server import StreamingResult
from chatkit.store import NotFoundError
from chatkit.types import (
    ChatKitReq,
    ItemsListReq,
    ThreadsAddUserMessageReq,
    ThreadsListReq,
    is_streaming_req,
)
from pydantic import ValidationError
from pydantic_core import from_json
from starlette.requests import Request
from starlette.responses import Response

from app.chat.runs import RunRegistry
from app.chat.server import CHATKIT_REQUEST
from app.chat.stream_events import error_chunk
from app.context import ReadCache, RequestContext, RunClaim
from app.errors import (
    InvalidInputError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    ThreadBusyError,
    TooManyRequestsError,
)
from app.files.uploads import declared_length
from app.http.middleware import RequestInfo, request_info
from app.http.runs import resumable_runs, start_run
from app.http.runtime import Runtime
from app.http.sse import SSE_HEADERS, EventPump, SSEResponse
from app.ids import check_ids, new_id
from app.observability import Stopwatch, op_var, thread_id_var, user_id_var
from app.pg.admission import PendingAdmission
from app.pg.limits import Limits, StreamLease
from app.pg.store import MAX_PAGE_SIZE
from app.sanitize import body_has_unstorable_text

log = logging.getLogger(__name__)

_LANGUAGE_TAG = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8}){0,3}")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,40}")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes whether or not Content-Length says so."""
    size = declared_length(request.headers.get("content-length"))
    if size is not None and size > limit:
        raise PayloadTooLargeError(f"The request body may not exceed {limit} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"The request body may not exceed {limit} bytes.")
    return bytes(body)


def _field_path(loc: tuple[int | str, ...]) -> str | None:
    """A validation error's location, keeping only names that are ours (never client data)."""
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif _FIELD_NAME.fullmatch(part) and not part.startswith(("function-", "tagged-")):
            parts.append(part)
        else:
            parts.append("*")
    return ".".join(parts) or None


def parse_request(body: bytes) -> ChatKitReq:
    """The request, checked as the SDK's schema does and then stricter where the store needs
    it: every id bounded (app.ids), ``limit`` a JSON integer within the page cap."""
    try:
        request = CHATKIT_REQUEST.validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        first = errors[0] if errors else None
        kind = first["type"] if first else ""
        if kind in ("json_invalid", "json_type"):
            raise InvalidInputError("The request body is not valid JSON.") from None
        if kind == "union_tag_invalid":
            raise InvalidInputError("Unknown request type.", field="type") from None
        if kind == "union_tag_not_found":
            raise InvalidInputError("The request has no type.", field="type") from None
        if kind in ("dict_type", "model_attributes_type") and first and not first["loc"]:
            raise InvalidInputError("The request body must be a JSON object.") from None
        field = _field_path(tuple(first["loc"])) if first else None
        raise InvalidInputError("Invalid request.", field=field) from None
    # Error fields are named as the schema's are: the request type first.
    check_ids(request.params, f"{request.type}.params")
    if isinstance(request, ThreadsListReq | ItemsListReq) and request.params.limit is not None:
        _check_limit(body, f"{request.type}.params.limit")
    return request


def _check_limit(body: bytes, field: str) -> None:
    """The SDK's schema turns ``true``, ``"10"`` and ``3.0`` into integers and lets ``0``
    through (then read as "the default"): the raw value must be an integer from 1 to the cap.
    Only list requests with a limit pay for this second parse of a (small) body."""
    params = from_json(body).get("params")
    limit = params.get("limit") if isinstance(params, dict) else None
    if type(limit) is not int or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInputError(f"limit must be an integer from 1 to {MAX_PAGE_SIZE}.", field=field)


def locale_from(accept_language: str | None) -> str | None:
    """The first language tag of ``Accept-Language`` (ignoring weights), if well formed."""
    if not accept_language:
        return None
    first = accept_language.split(",", 1)[0].split(";", 1)[0].strip()
    if first == "*" or not _LANGUAGE_TAG.fullmatch(first):
        return None
    return first


async def chatkit_endpoint(request: Request) -> Response:
    """Every request counts once against the user's rate limit (app.pg.limits). A list request
    leaves its admission to the statement that reads its page (app.pg.admission; it travels on
    the request's context, ``RequestContext.page_fold``): one round trip
    instead of two. Whatever did not count it by the end (another store, a Citus cluster, an
    error before the store ran) counts it then, and a refusal replaces the answer or the error
    with the 429. A message to a thread (``threads.add_user_message``) is admitted by the
    statement that opens its turn (``Limits.begin_turn``: the admission, the thread, the lease
    and the run's row in one call). Every other request is admitted as soon as its type is
    known, before any of its work."""
    runtime: Runtime = request.app.state.runtime
    if runtime.drain is not None:
        runtime.drain.check()  # shutting down: a 503 the client retries elsewhere
    user_id = await runtime.verifier.authenticate(request.headers.get("authorization"))
    user_id_var.set(user_id)
    limits = runtime.limits
    admission = limits.defer(user_id) if limits is not None else None
    if limits is None or admission is None:
        return await _serve(request, runtime, user_id, None)
    try:
        response = await _serve(request, runtime, user_id, admission)
    except ServiceUnavailableError:
        # The database is away or too slow (a lock, a timeout): not counted and not tried
        # again, as when an admission of its own fails.
        raise
    except Exception:
        try:
            await limits.settle(admission)
        except TooManyRequestsError:
            raise  # the 429 replaces the request's own error
        except Exception as exc:  # not counted: the request's own error stands
            log.warning("request not counted", extra={"reason": type(exc).__name__})
        raise
    await limits.settle(admission)
    return response


async def _begin_turn(
    limits: Limits,
    admission: PendingAdmission | None,
    context: RequestContext,
    thread_id: str,
    runs: RunRegistry | None,
) -> tuple[StreamLease | None, str | None]:
    """A message to a thread opened in one statement (``Limits.begin_turn``): counted, its
    thread read (into the request's ``reads``, for the checks and the SDK), its lease taken
    and, with ``runs``, its run's row written. Returns the lease (None: the thread is busy,
    wait for it) and the run's id when its row is written. On a Citus cluster the thread is
    read by the run's start (one delegated call, ``RunLog.open``) or by the checks after."""
    run_id = new_id("run") if runs is not None else None
    started = await limits.begin_turn(admission, context.user_id, thread_id, run_id)
    thread, lease = started.thread, started.lease
    started_run = run_id if started.run_started else None
    if thread is None and lease is not None and runs is not None and run_id is not None:
        thread = await runs.runlog.open(context.user_id, run_id, thread_id)
        if thread is None:
            await lease.release()
            raise NotFoundError(f"Thread {thread_id} not found")
        started_run = run_id
    if context.reads is not None and thread is not None:
        context.reads.threads[thread_id] = thread
    return lease, started_run


async def _serve(
    request: Request, runtime: Runtime, user_id: str, admission: PendingAdmission | None
) -> Response:
    settings = runtime.settings
    limits = runtime.limits
    info = request_info(request.scope) or RequestInfo(request_id="")
    body = await read_body(request, settings.max_body_bytes)
    chatkit_request = parse_request(body)
    listing = isinstance(chatkit_request, ThreadsListReq | ItemsListReq)
    # A turn (a message to a thread, streamed) is counted by the statement that opens it.
    turn = isinstance(chatkit_request, ThreadsAddUserMessageReq) and limits is not None
    if limits is not None and not listing and not turn:
        # Only list requests, which change nothing, defer it (to the store, on their context);
        # the rest are counted before any of their work. A body that does not parse is counted
        # by the caller's error path.
        await limits.settle(admission)
    info.op = chatkit_request.type
    op_var.set(chatkit_request.type)
    thread_id = getattr(chatkit_request.params, "thread_id", None)
    if isinstance(thread_id, str):
        thread_id_var.set(thread_id)
    if body_has_unstorable_text(body):
        raise InvalidInputError("Text may not contain NUL characters or unpaired surrogates.")

    context = RequestContext(
        user_id=user_id,
        locale=locale_from(request.headers.get("accept-language")),
        request_id=info.request_id,
        page_fold=admission if listing else None,
        # What a stream's steps read once is not read again (app.pg.store).
        reads=ReadCache() if is_streaming_req(chatkit_request) else None,
    )
    server = runtime.server
    streaming = is_streaming_req(chatkit_request)
    if streaming and runtime.drain is not None:
        runtime.drain.check()  # its body came in after SIGTERM: no new reply starts here
    cap = settings.max_streams_per_process
    if streaming and cap and runtime.open_streams >= cap:
        if turn and limits is not None:
            await limits.settle(admission)  # counted, as every refused request is
        raise ServiceUnavailableError("This server is busy.", retry_after=2)
    # The slot is taken now, not once the response exists: requests arriving together would
    # otherwise all pass the check above while the first is still awaiting the database.
    if streaming:
        runtime.open_streams += 1
    handed_over = False
    lease: StreamLease | None = None
    runs = resumable_runs(request) if streaming else None  # opted in (app.http.runs)
    run_id: str | None = None
    try:
        run_started = False
        if turn and limits is not None and isinstance(chatkit_request, ThreadsAddUserMessageReq):
            # A message with attachments has them checked after this: its run's row is
            # written afterwards, so that a refused attachment leaves no run behind.
            with_run = runs is not None and not chatkit_request.params.input.attachments
            lease, run_id = await _begin_turn(
                limits,
                admission,
                context,
                chatkit_request.params.thread_id,
                runs if with_run else None,
            )
            run_started = run_id is not None
        try:
            checked = await server.precheck(chatkit_request, context)
        except BaseException:
            if lease is not None:
                await lease.release()
            raise
        if limits is not None and streaming and lease is None:
            try:
                lease = await limits.lease(
                    user_id, thread_id if isinstance(thread_id, str) else None
                )
            except ThreadBusyError as exc:
                # Inside the protocol, so ChatKit shows the message in the conversation.
                return Response(
                    error_chunk(exc), media_type="text/event-stream", headers=SSE_HEADERS
                )
        if lease is not None:
            context = replace(context, lease=lease)  # the reply claims its new thread
        try:
            if runs is not None and not run_started:
                run_id = await runs.create(
                    user_id, thread_id if isinstance(thread_id, str) else None
                )
            if run_id is not None:
                context = replace(context, run=RunClaim())
            result = await server.process_parsed(chatkit_request, context, checked)
        except BaseException:
            if lease is not None:
                await lease.release()
            raise
        if not isinstance(result, StreamingResult):
            return Response(result.json, media_type="application/json")
        handed_over = True  # from here on_close gives the slot back
    finally:
        if streaming and not handed_over:
            runtime.open_streams -= 1

    info.streaming = True
    metrics = runtime.metrics
    op = chatkit_request.type
    if runs is not None and run_id is not None:  # detached: the run gives the slot back
        source = result if lease is None else lease.hold(result)
        return start_run(runtime, runs, run_id, user_id, source, op, context.run)
    watch = Stopwatch()
    metrics.active_streams.inc()

    def on_close(outcome: str) -> None:
        if drain is not None:
            drain.streams.discard(pump)
        metrics.active_streams.dec()
        runtime.open_streams -= 1
        metrics.stream_seconds.labels(op, outcome).observe(watch.seconds)
        log.info("stream closed", extra={"outcome": outcome, "duration_ms": watch.ms})

    pump = EventPump(
        result if lease is None else lease.hold(result),
        tasks=runtime.tasks,
        heartbeat_seconds=settings.sse_heartbeat_seconds,
        error_chunk=error_chunk,
        max_buffered_bytes=settings.stream_buffer_bytes,
    )
    drain = runtime.drain
    if drain is not None:
        drain.streams.add(pump)  # cut with an error event if it outlasts a shutdown's grace
    return SSEResponse(pump, stall_seconds=settings.stream_stall_seconds, on_close=on_close)
