"""The FastAPI application: ``create_app`` builds it, ``lifespan`` owns every resource.

Nothing connects at import time. The engine, the store, the model client, MCP sessions and
the ChatKit server are created when the app starts and closed when it stops. Errors are mapped
to HTTP here, in one place: client mistakes are 4xx JSON with a safe message; anything else is
a generic 500 whose details only go to the log, under the request id.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from agents import Model
from chatkit.store import NotFoundError, Store
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.background import TaskRegistry
from app.chat.agent import (
    build_agent,
    build_title_agent,
    choose_model,
    connect_mcp_servers,
    load_instructions,
)
from app.chat.agent_run import PacedModel
from app.chat.converter import AttachmentConverter
from app.chat.dictation import build_transcriber
from app.chat.identity import load_identity
from app.chat.identity import router as identity_router
from app.chat.plugins import load_plugins
from app.chat.server import ChatKitPgServer, ServerOptions
from app.context import RequestContext
from app.errors import (
    AppError,
    AuthenticationError,
    ConfigurationError,
    RetryLaterError,
    ServiceUnavailableError,
)
from app.files.routes import files_router
from app.files.store import PgAttachmentStore
from app.http import devpage
from app.http import runs as run_routes
from app.http.auth import TokenVerifier, check_auth_settings
from app.http.drain import Drain
from app.http.endpoint import chatkit_endpoint
from app.http.health import alembic_heads
from app.http.health import router as ops_router
from app.http.me import me_router
from app.http.middleware import AccessLogMiddleware, request_info
from app.http.runtime import Runtime
from app.http.search import search_router
from app.observability import Metrics, configure_logging, user_id_var
from app.pg.engine import aresolve_database_url
from app.pg.limits import Limits
from app.pg.metered import MeteredStore
from app.pg.pool import open_pool
from app.pg.search import verify_search_config
from app.pg.store import PostgresStore
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    model: Model | None = None,
    store: Store[RequestContext] | None = None,
) -> FastAPI:
    """The ASGI app. ``model`` replaces the configured model (tests, embedding apps) and
    ``store`` the Postgres store as the ChatKit server's store (benchmarks, fault tests); both
    are optional. The parts built on the pool (attachments, limits, the plugins' tables) are
    there either way.

    ``app.state`` holds the configuration (``settings``, ``metrics``) and, while the app runs,
    the one ``Runtime`` (app.http.runtime) the lifespan built; the routes take everything else
    from it."""
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    check_auth_settings(settings)  # fail before serving, with a message saying what to set

    app = FastAPI(
        title="chatkit-pg",
        lifespan=_lifespan_with(Overrides(model=model, store=store)),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # No "/chatkit/" -> "/chatkit" redirects: Starlette builds their Location from the
        # request's Host header (an open redirect for whoever sets it); a path with a slash
        # too many is a 404 like any unknown path.
        redirect_slashes=False,
        # FastAPI's own OpenTelemetry hooks ask on every request whether a provider is set up
        # (environment and global lookups) and would record exception messages; the service's
        # telemetry is its Prometheus metrics and JSON logs (app.observability).
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    metrics = Metrics()
    app.state.settings = settings
    app.state.metrics = metrics

    install_error_handlers(app)
    app.include_router(ops_router)
    app.include_router(identity_router)  # GET /.well-known/jwks.json, for MCP servers
    devpage.install(app, settings)  # GET / and /dev/token, development mode only
    # A plain Starlette route: the endpoint reads the request itself, so FastAPI's dependency
    # machinery would only add cost to every ChatKit call.
    app.add_route(settings.chatkit_path, chatkit_endpoint, methods=["POST"])
    run_routes.install(app, settings.chatkit_path)  # resumable replies (docs/runs.md)
    # Attachment bytes (app.files.routes): uploads, downloads, signed previews; errors go to the
    # handlers below like every other route's.
    app.include_router(files_router(bearer_user))
    app.include_router(me_router(bearer_user))  # GET /me/export (app.http.me)
    app.include_router(search_router(bearer_user, settings.chatkit_path))  # docs/search.md
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", run_routes.RUN_HEADER],
            max_age=600,
        )
    app.add_middleware(AccessLogMiddleware, metrics=metrics, chatkit_path=settings.chatkit_path)
    return app


@dataclass(frozen=True)
class Overrides:
    """What ``create_app``'s caller put in place of the configured parts (None: the configured
    one), handed to the lifespan."""

    model: Model | None = None
    store: Store[RequestContext] | None = None


def _lifespan_with(
    overrides: Overrides,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with _resources(app, overrides):
                yield
        except ConfigurationError as exc:
            if getattr(app.state, "runtime", None) is not None:
                raise
            # Started as `uvicorn app.main:create_app` (the image), not `python -m app serve`: the
            # operator reads one line naming the setting; the traceback uvicorn would add is
            # dropped by the log handler (observability.StartupTracebackFilter).
            log.error("chatkit-pg cannot start: %s", exc)
            raise

    return lifespan


@asynccontextmanager
async def _resources(app: FastAPI, overrides: Overrides) -> AsyncIterator[None]:
    """Build every resource once, hand each part what it uses, and put the ``Runtime`` on
    ``app.state``; close them all (in reverse) when the app stops."""
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    async with AsyncExitStack() as stack:
        verifier = TokenVerifier.from_settings(settings)
        stack.push_async_callback(verifier.aclose)

        database_url = await aresolve_database_url(settings)
        pool = await open_pool(database_url, settings)
        stack.push_async_callback(pool.close)
        # The run log's appends and reads in a pool of their own (app.pg.runlog says why);
        # closed before the app's pool, after the runs' last writes (``drain.finish``).
        log_pool = None
        if settings.run_log_pool_size:
            log_pool = await open_pool(database_url, settings, size=settings.run_log_pool_size)
            stack.push_async_callback(log_pool.close)
        await verify_search_config(pool, settings.search_text_config)
        tasks = TaskRegistry()
        # Everything that lives in the database is built on the pool, whatever the chat store:
        # the Postgres store (the attachments' rows are its), the attachments, the limits and
        # the plugins' tables. A caller's own store (benchmarks, fault tests) replaces only the
        # store the ChatKit server reads threads and items from.
        pg_store = PostgresStore(pool)
        inner: Store[RequestContext] = overrides.store or pg_store
        store = MeteredStore(inner, metrics.store_seconds)
        attachments = PgAttachmentStore(pool, pg_store, settings).install()
        limits = Limits(pool, settings, tasks)

        plugins = load_plugins(settings.chatkit_plugins)
        model = choose_model(settings, overrides.model)
        stack.push_async_callback(model.aclose)
        transcriber = build_transcriber(settings)
        if transcriber is not None:
            stack.push_async_callback(transcriber.aclose)
        # The key signing MCP identity tokens (cmd_serve has checked it already).
        identity = load_identity(settings)
        mcp_servers = await connect_mcp_servers(settings, stack, identity)
        agent = build_agent(
            plugins.instructions(load_instructions(settings)),
            PacedModel(model.model),  # waits for the reply's reader (app.chat.agent_run)
            mcp_servers,
            max_output_tokens=settings.max_output_tokens,
            tools=plugins.tools,
        )

        server = ChatKitPgServer(
            store,
            agent,
            options=ServerOptions(
                history_items=settings.history_items,
                max_turns=settings.agent_max_turns,
                thread_titles=settings.thread_titles,
                tracing=settings.agents_tracing,
                max_attachments_per_message=settings.max_attachments_per_message,
                save_retry_seconds=settings.save_retry_seconds,
            ),
            title_agent=None if model.is_offline else build_title_agent(model.model),
            tasks=tasks,
            attachment_store=attachments,
            converter=_converter_factory(attachments),
            plugins=plugins,
            pool=pool,
            transcriber=transcriber,
        )
        app.state.runtime = Runtime(
            settings=settings,
            metrics=metrics,
            pool=pool,
            store=store,
            server=server,
            verifier=verifier,
            tasks=tasks,
            model=model,
            alembic_heads=await asyncio.to_thread(alembic_heads, plugins.migration_locations),
            limits=limits,
            attachments=attachments,
            identity=identity,
            # Resumable replies (docs/runs.md).
            runs=run_routes.build_registry(pool, tasks, settings, server, metrics, log_pool),
        )
        runtime = app.state.runtime
        # SIGTERM: refuse new work, let replies finish within the grace (app.http.drain).
        runtime.drain = Drain(settings.shutdown_grace_seconds, tasks, runtime.runs, metrics)
        runtime.drain.install()
        freeze_startup_objects()
        # Handed back at the stop: a process starting apps one after another (the tests) would
        # otherwise keep each one's cycles for ever.
        stack.callback(gc.unfreeze)
        log.info(
            "chatkit-pg ready",
            extra={"model": f"{model.provider}:{model.name}", "kind": verifier.mode},
        )
        try:
            yield
        finally:
            # Replies finish (or are cut at the grace's end) and their saves and the run logs'
            # last writes are done before the pool goes away.
            await runtime.drain.finish()


def freeze_startup_objects() -> None:
    """Take every object alive once the app has started (its modules, schemas, agent, pool:
    some 260,000) out of the cyclic collector's sight (``gc.freeze``). They live as long as the
    process, yet each full collection walked them all: a pause of the event loop of 150 to 400 ms
    on a 2-core machine, every few seconds under load, and each stream whose next event fell
    due meanwhile sent it that much late (the soak's gap between deltas, docs/reliability.md).
    A full collection now walks only what the replies hold. No collection first: the garbage
    of startup is a few hundred objects (223 in the soak's server), kept for the life of the
    process, where a full collection would stall every start (and each app a test starts) for
    about as long as the pause it saves."""
    gc.freeze()


def _converter_factory(
    attachments: PgAttachmentStore,
) -> Callable[[RequestContext], AttachmentConverter]:
    converter = AttachmentConverter(attachments)
    return lambda context: converter.for_user(context.user_id)


async def bearer_user(request: Request) -> str:
    """The user of a ``/files`` request, from its Bearer token (as for ``/chatkit``)."""
    runtime: Runtime = request.app.state.runtime
    user_id = await runtime.verifier.authenticate(request.headers.get("authorization"))
    user_id_var.set(user_id)
    if runtime.limits is not None:
        await runtime.limits.admit(user_id)
    return user_id


# --- errors -------------------------------------------------------------------------------


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    *,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    info = request_info(request.scope)
    error: dict[str, str] = {"code": code, "message": message}
    if field:
        error["field"] = field
    if info is not None:
        error["request_id"] = info.request_id
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _cause_name(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return type(cause).__name__ if cause is not None else type(exc).__name__


def install_error_handlers(app: FastAPI) -> None:
    async def app_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AppError)
        headers: dict[str, str] | None = None
        if isinstance(exc, RetryLaterError):
            headers = {"Retry-After": str(exc.retry_after)}
        if exc.status_code >= 500:
            if isinstance(exc, ServiceUnavailableError):
                # Expected while a dependency is down: one line, the cause without a traceback.
                log.warning("request failed: %s", exc.message, extra={"reason": _cause_name(exc)})
            else:
                log.error("request failed: %s", type(exc).__name__, exc_info=exc)
            return error_response(
                request, exc.status_code, exc.code, type(exc).public_message, headers=headers
            )
        if isinstance(exc, AuthenticationError):
            headers = {"WWW-Authenticate": exc.www_authenticate}
        return error_response(
            request, exc.status_code, exc.code, exc.message, field=exc.field, headers=headers
        )

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, 404, "not_found", "Not found.")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {404: "Not found.", 405: "Method not allowed."}.get(
            exc.status_code, "HTTP error."
        )
        return error_response(
            request,
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            message,
            headers=dict(exc.headers) if exc.headers else None,
        )

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, 400, "invalid_request", "Invalid request.")

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Runs outside the request middleware, so the request id header is added here.
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        info = request_info(request.scope)
        headers = {"X-Request-ID": info.request_id} if info else None
        return error_response(
            request, 500, "internal_error", "Internal server error.", headers=headers
        )

    app.add_exception_handler(AppError, app_error)
    app.add_exception_handler(NotFoundError, not_found)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
