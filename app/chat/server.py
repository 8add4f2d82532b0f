"""``ChatKitPgServer``: ChatKit's server over the Postgres store and an Agents SDK agent.

Its parts live beside it: the widget actions (app.chat.actions), the stream steps that keep a
stream's story and the thread's in agreement (app.chat.stream_outcome), the settled writes
(app.chat.settle) and the items' conversion to model input (app.chat.item_converter,
app.chat.converter). What is the request's own comes on its ``RequestContext`` (app.context),
never from context variables.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from agents import Agent, RunConfig
from chatkit.agents import AgentContext, ThreadItemConverter
from chatkit.errors import CustomStreamError
from chatkit.server import (
    DEFAULT_PAGE_SIZE,
    NonStreamingResult,
    StreamingResult,
)
from chatkit.store import AttachmentStore, Store
from chatkit.types import (
    AttachmentsCreateReq,
    AttachmentsDeleteReq,
    AudioInput,
    ChatKitReq,
    ClientToolCallItem,
    FeedbackKind,
    HiddenContextItem,
    InputTranscribeReq,
    ItemsFeedbackReq,
    ItemsListReq,
    Page,
    SDKHiddenContextItem,
    StructuredInputItem,
    ThreadItem,
    ThreadMetadata,
    ThreadsAddClientToolOutputReq,
    ThreadsAddStructuredInputReq,
    ThreadsAddUserMessageReq,
    ThreadsCreateReq,
    ThreadsCustomActionReq,
    ThreadsDeleteReq,
    ThreadsListReq,
    ThreadsRetryAfterItemReq,
    ThreadsSyncCustomActionReq,
    ThreadStreamEvent,
    TranscriptionResult,
    UserMessageInput,
    UserMessageItem,
    is_streaming_req,
)
from pydantic import TypeAdapter
from pydantic_core import to_json

from app.background import TaskRegistry
from app.chat.actions import ActionTarget, WidgetActions
from app.chat.agent_run import reply_events
from app.chat.dictation import NO_TRANSCRIPTION, Transcriber
from app.chat.item_converter import PgThreadItemConverter
from app.chat.model_files import ReplyFiles
from app.chat.plugins import (
    PluginAgentContext,
    PluginSet,
)
from app.chat.settle import SettledWrites
from app.chat.stream_events import ItemIds, clean_event
from app.chat.stream_outcome import reply_complete
from app.chat.titles import make_title
from app.context import RequestContext
from app.errors import (
    AttachmentInUseError,
    InvalidInputError,
    UnsupportedError,
)
from app.observability import thread_id_var
from app.pg.pool import ConnectionPool
from app.sanitize import clean_model

log = logging.getLogger(__name__)

CHATKIT_REQUEST = TypeAdapter[ChatKitReq](ChatKitReq)


TitleMode = Literal["model", "first_message", "off"]
ConverterFactory = Callable[[RequestContext], ThreadItemConverter]


_THREAD_FIELDS = {"title", "id", "created_at", "status", "allowed_image_domains"}


def thread_list_json(page: Page[ThreadMetadata]) -> bytes:
    """The SDK's ``threads.list`` answer, byte for byte, at half its cost.

    The SDK rebuilds a validated ``Thread`` (with an empty item page) per row before
    serialising; this dumps the same fields once (tested against the SDK's own output)."""
    data = []
    for thread in page.data:
        row = thread.model_dump(
            mode="json", by_alias=True, exclude_none=True, include=_THREAD_FIELDS
        )
        row["metadata"] = {}
        row["items"] = {"data": [], "has_more": False}
        data.append(row)
    body: dict[str, Any] = {"data": data, "has_more": page.has_more}
    if page.after is not None:
        body["after"] = page.after
    return to_json(body)


@runtime_checkable
class FeedbackStore(Protocol):
    async def save_feedback(
        self,
        thread_id: str,
        item_ids: Sequence[str],
        kind: FeedbackKind,
        context: RequestContext,
    ) -> None: ...


@dataclass(frozen=True)
class ServerOptions:
    history_items: int = 40
    max_turns: int = 10
    thread_titles: TitleMode = "model"
    tracing: bool = False
    title_timeout_seconds: float = 20.0
    max_attachments_per_message: int = 10
    # How long a write of a reply whose outcome is unknown is retried (app.chat.settle); 0: never.
    save_retry_seconds: float = 30.0


class ChatKitPgServer(WidgetActions):
    def __init__(
        self,
        store: Store[RequestContext],
        agent: Agent[AgentContext[RequestContext]],
        *,
        options: ServerOptions | None = None,
        title_agent: Agent[Any] | None = None,
        tasks: TaskRegistry | None = None,
        attachment_store: AttachmentStore[RequestContext] | None = None,
        converter: ThreadItemConverter | ConverterFactory | None = None,
        plugins: PluginSet | None = None,
        pool: ConnectionPool | None = None,
        transcriber: Transcriber | None = None,
    ) -> None:
        self.options = options or ServerOptions()
        self.tasks = tasks or TaskRegistry()
        # A reply's writes are settled before the client is told how they went (app.chat.settle).
        settled = SettledWrites(
            store, tasks=self.tasks, retry_seconds=self.options.save_retry_seconds, pool=pool
        )
        super().__init__(settled, attachment_store)
        self.agent = agent
        # None means "derive titles from the first message" (the offline model).
        self.title_agent = title_agent
        # A converter, or a factory making one per request (for converters bound to a user).
        self.converter = converter or PgThreadItemConverter()
        # Widget actions go to plugins (app.chat.actions, app.chat.plugins), whose tables are
        # reached through the app's pool (``pool``: also the settled writes' fence).
        self.plugins = plugins or PluginSet()
        self.plugin_pool = pool
        # None: no speech-to-text provider (the offline model), so dictation is refused.
        self.transcriber = transcriber
        self.run_config = RunConfig(
            tracing_disabled=not self.options.tracing,
            trace_include_sensitive_data=False,
            workflow_name="chatkit-pg",
        )

    def converter_for(self, context: RequestContext) -> ThreadItemConverter:
        if isinstance(self.converter, ThreadItemConverter):
            return self.converter
        return self.converter(context)

    # --- dispatch ----------------------------------------------------------------------------

    async def process(
        self, request: str | bytes | bytearray, context: RequestContext
    ) -> StreamingResult | NonStreamingResult:
        """As the SDK's, but with a TypeAdapter built once: the SDK builds one per request,
        which costs ~7 ms of CPU each time (most of a ``threads.list``)."""
        return await self.process_parsed(CHATKIT_REQUEST.validate_json(request), context)

    async def process_parsed(
        self,
        request: ChatKitReq,
        context: RequestContext,
        checked: ActionTarget | None = None,
    ) -> StreamingResult | NonStreamingResult:
        """Run a request the endpoint has already parsed and checked; ``checked`` is what
        ``precheck`` returned (an action's thread and widget, read once)."""
        if isinstance(request, ItemsListReq):
            return NonStreamingResult(await self._list_items(request, context))
        if isinstance(request, ThreadsListReq):
            params = request.params
            threads = await self.store.load_threads(
                params.limit or DEFAULT_PAGE_SIZE, params.after, params.order, context
            )
            return NonStreamingResult(thread_list_json(threads))
        if isinstance(request, ThreadsCustomActionReq):
            return StreamingResult(await self._start_action(request, context, checked))
        if isinstance(request, ThreadsSyncCustomActionReq):
            action = request.params
            target = await self._action_context(
                action.thread_id, action.item_id, action.action, context, checked
            )
            answer = await self.sync_action(target.thread, action.action, target.sender, context)
            return NonStreamingResult(self._serialize(answer))
        if isinstance(request, InputTranscribeReq):
            return NonStreamingResult(await self._transcribe(request, context))
        if is_streaming_req(request):
            return StreamingResult(self._process_streaming(request, context))
        return NonStreamingResult(await self._process_non_streaming(request, context))

    async def _list_items(self, request: ItemsListReq, context: RequestContext) -> bytes:
        """``items.list`` as the SDK does it, in one query when the thread has items: a page
        of the user's items proves the thread is theirs; only an empty first page needs the
        thread looked up (so another user's thread is a 404, not an empty list)."""
        params = request.params
        page = await self.store.load_thread_items(
            params.thread_id, params.after, params.limit or DEFAULT_PAGE_SIZE, params.order, context
        )
        if not page.data and params.after is None:
            await self.store.load_thread(params.thread_id, context)
        page.data = [
            item
            for item in page.data
            if not isinstance(item, HiddenContextItem | SDKHiddenContextItem)
        ]
        return self._serialize(page)

    # --- checks before a response starts ---------------------------------------------------

    async def precheck(self, request: ChatKitReq, context: RequestContext) -> ActionTarget | None:
        """Everything that would otherwise fail inside a stream (after the 200 is sent) is
        checked here first, so the client gets a proper 404 or 400 instead. An action's thread
        and widget come back, for ``process_parsed``."""
        store = self.store
        match request:
            case ThreadsCreateReq():
                await self._check_attachments(request.params.input, None, context)
            case ThreadsAddUserMessageReq():
                thread_id = request.params.thread_id
                await store.load_thread(thread_id, context)
                await self._check_attachments(request.params.input, thread_id, context)
            case ThreadsAddClientToolOutputReq():
                await store.load_thread(request.params.thread_id, context)
                last = await store.load_thread_items(
                    request.params.thread_id, None, 1, "desc", context
                )
                if not (
                    last.data
                    and isinstance(last.data[0], ClientToolCallItem)
                    and last.data[0].status == "pending"
                ):
                    raise InvalidInputError("The thread has no pending client tool call.")
            case ThreadsAddStructuredInputReq():
                await store.load_thread(request.params.thread_id, context)
                item = await store.load_item(
                    request.params.thread_id, request.params.item_id, context
                )
                if not isinstance(item, StructuredInputItem) or item.status != "pending":
                    raise InvalidInputError("The item is not a pending structured input.")
            case ThreadsRetryAfterItemReq():
                await store.load_thread(request.params.thread_id, context)
                item = await store.load_item(
                    request.params.thread_id, request.params.item_id, context
                )
                if not isinstance(item, UserMessageItem):
                    raise InvalidInputError("Only a user message can be retried.")
            case ThreadsCustomActionReq() | ThreadsSyncCustomActionReq():
                return await self.check_action(request, context)
            case ItemsFeedbackReq():
                # With no item ids the store would not look at the thread at all.
                await store.load_thread(request.params.thread_id, context)
            case ThreadsDeleteReq():
                # The store's delete is idempotent (the SDK's contract); the client gets a 404.
                await store.load_thread(request.params.thread_id, context)
            case AttachmentsCreateReq():
                if self.attachment_store is None:
                    raise UnsupportedError("This server does not accept attachments.")
            case AttachmentsDeleteReq():
                if self.attachment_store is None:
                    raise UnsupportedError("This server does not accept attachments.")
                await store.load_attachment(request.params.attachment_id, context)
            case InputTranscribeReq():
                if self.transcriber is None:
                    raise UnsupportedError(NO_TRANSCRIPTION)
                self.transcriber.check(request.params)
            case _:
                pass
        return None

    async def _check_attachments(
        self, input: UserMessageInput, thread_id: str | None, context: RequestContext
    ) -> None:
        """Repeats collapsed and at most the limit of distinct ids (refused before anything is
        loaded); each attachment is the user's (all loaded first: a missing one is a 404
        whatever the others are), and unsent or already in this thread (``thread_id``; None for
        a new one): an attachment belongs to the thread that first sent it (the store refuses
        it elsewhere; here that is a 409 before a new thread is made)."""

        def refused(message: str) -> Exception:
            return InvalidInputError(message, field="params.input.attachments")

        input.attachments = self._attachment_ids(input.attachments, refused)
        attachments = [await self.store.load_attachment(i, context) for i in input.attachments]
        if any(a.thread_id not in (None, thread_id) for a in attachments):
            raise AttachmentInUseError()

    def _attachment_ids(self, ids: list[str], error: Callable[[str], Exception]) -> list[str]:
        """``ids`` with repeats collapsed (a file is attached once), at most the limit of
        distinct ones: more is refused before anything is loaded."""
        unique = list(dict.fromkeys(ids))
        limit = self.options.max_attachments_per_message
        if len(unique) > limit:
            raise error(f"A message can carry at most {limit} attachment{'s' * (limit != 1)}.")
        return unique

    async def _build_user_message_item(
        self, input: UserMessageInput, thread: ThreadMetadata, context: RequestContext
    ) -> UserMessageItem:
        # The same rule for callers of ``process`` that skip ``precheck``, inside the stream.
        def refused(message: str) -> Exception:
            return CustomStreamError(message, allow_retry=False)

        ids = self._attachment_ids(input.attachments, refused)
        if ids != input.attachments:
            input = input.model_copy(update={"attachments": ids})
        return await super()._build_user_message_item(input, thread, context)

    # --- the reply -----------------------------------------------------------------------

    async def respond(
        self,
        thread: ThreadMetadata,
        input_user_message: UserMessageItem | None,
        context: RequestContext,
    ) -> AsyncIterator[ThreadStreamEvent]:
        thread_id_var.set(thread.id)
        lease = context.lease  # the endpoint's stream lease (app.pg.limits)
        if lease is not None:
            await lease.attach(thread.id)  # a new thread's reply claims it
        page = await self.store.load_thread_items(
            thread.id, None, self.options.history_items, "desc", context
        )
        history = list(reversed(page.data))
        converter = self.converter_for(context)
        agent_input = await converter.to_agent_input(history)
        # Attachments are markers in ``agent_input``, their bytes read just before each model
        # call and released when the reply ends (app.chat.model_files).
        files = getattr(converter, "files", None)
        files = files if isinstance(files, ReplyFiles) else None

        agent_context = PluginAgentContext(
            thread=thread,
            store=self.store,
            request_context=context,
            db=self.user_database(context),
        )
        ids = ItemIds(lambda: self.store.generate_item_id("message", thread, context))
        finished = False
        events = 0
        try:
            async for event in reply_events(
                self.agent,
                agent_input,
                agent_context,
                max_turns=self.options.max_turns,
                run_config=self.run_config if files is None else files.run_config(self.run_config),
            ):
                events += 1
                yield ids.apply(clean_event(event))
            finished = True
        finally:
            log.info("reply %s", "finished" if finished else "stopped", extra={"events": events})
            if files is not None:
                files.release()
        if context.stream is not None:
            context.stream.reply_complete = True

        if (
            input_user_message is not None
            and thread.title is None
            and self.options.thread_titles != "off"
        ):
            title = await make_title(
                input_user_message,
                title_agent=self.title_agent if self.options.thread_titles == "model" else None,
                run_config=self.run_config,
                time_limit=self.options.title_timeout_seconds,
            )
            if title:
                thread.title = title  # the SDK saves it and sends thread.updated

    # --- cancellation ----------------------------------------------------------------------

    async def handle_stream_cancelled(
        self,
        thread: ThreadMetadata,
        pending_items: list[ThreadItem],
        context: RequestContext,
    ) -> None:
        """Save the partial reply and the "cancelled" marker even though we are being cancelled.

        The saves run in a task of their own (kept by the registry, which shutdown waits for);
        shielding means a second cancellation stops only our waiting, never the saves.
        """
        if not pending_items and reply_complete(context):
            return
        if context.run is not None and context.run.taken_over:
            return  # declared lost elsewhere, where what it logged was stored (app.chat.runs)
        items = [clean_model(item) for item in pending_items]
        save = self.tasks.spawn(
            super().handle_stream_cancelled(thread, items, context), name="save-cancelled-reply"
        )
        await asyncio.shield(save)

    # --- the other operations ---------------------------------------------------------------

    async def add_feedback(
        self,
        thread_id: str,
        item_ids: list[str],
        feedback: FeedbackKind,
        context: RequestContext,
    ) -> None:
        if not isinstance(self.store, FeedbackStore):
            raise UnsupportedError("This server does not record feedback.")
        await self.store.save_feedback(thread_id, item_ids, feedback, context)

    async def transcribe(
        self, audio_input: AudioInput, context: RequestContext
    ) -> TranscriptionResult:
        if self.transcriber is None:
            raise UnsupportedError(NO_TRANSCRIPTION)
        return await self.transcriber.transcribe(audio_input)

    async def _transcribe(self, request: InputTranscribeReq, context: RequestContext) -> bytes:
        """Strict base64 (the SDK's decoding skips bad characters), then ``transcribe``."""
        if self.transcriber is None:
            raise UnsupportedError(NO_TRANSCRIPTION)
        audio = self.transcriber.decode(request.params)
        return self._serialize(await self.transcribe(audio, context))
