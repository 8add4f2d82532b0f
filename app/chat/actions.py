"""Widget actions, routed to plugins (app.chat.plugins): the server's ``threads.custom_action``
and ``threads.sync_custom_action``.

``check_action`` (part of ``ChatKitPgServer.precheck``) loads the thread and the widget item the
action comes from, refusing anything else before a response starts; it returns them as an
``ActionTarget``, which the endpoint hands back to ``process_parsed`` so that an action reads
them once.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from chatkit.actions import Action
from chatkit.errors import CustomStreamError
from chatkit.types import (
    SyncCustomActionResponse,
    ThreadItem,
    ThreadMetadata,
    ThreadsCustomActionReq,
    ThreadsSyncCustomActionReq,
    ThreadStreamEvent,
    WidgetItem,
)

from app.chat.plugins import ActionContext, PluginSet, UserDatabase, refusing_bad_values
from app.chat.stream_outcome import ConsistentStreams, streaming
from app.context import RequestContext
from app.errors import ActionRejectedError, InvalidInputError, UnsupportedError
from app.observability import thread_id_var
from app.pg.pool import ConnectionPool

ActionTarget = tuple[ThreadMetadata, WidgetItem]
"""The thread and the widget item an action comes from, as its precheck loaded them."""


class WidgetActions(ConsistentStreams):
    """The action half of ``ChatKitPgServer``: it sets ``plugins`` and ``plugin_pool``."""

    plugins: PluginSet
    # The pool the plugins' tables are reached through (app.chat.plugins.UserDatabase); None
    # when the app runs over another store (benchmarks): tools and handlers then have no database.
    plugin_pool: ConnectionPool | None

    def user_database(self, context: RequestContext) -> UserDatabase | None:
        if self.plugin_pool is None:
            return None
        return UserDatabase(self.plugin_pool, context.user_id)

    async def check_action(
        self,
        request: ThreadsCustomActionReq | ThreadsSyncCustomActionReq,
        context: RequestContext,
    ) -> ActionTarget | None:
        """The thread and widget item of the action, the user's; refused unless a plugin
        handles the action's type (saying nothing of which types exist)."""
        params = request.params
        target: ActionTarget | None = None
        thread = await self.store.load_thread(params.thread_id, context)
        if params.item_id:
            item = await self.store.load_item(params.thread_id, params.item_id, context)
            if not isinstance(item, WidgetItem):
                raise InvalidInputError("Actions can only come from a widget.")
            target = (thread, item)
        is_streaming = isinstance(request, ThreadsCustomActionReq)
        if not self.plugins.handles(params.action.type, streaming=is_streaming):
            # Says nothing of which types exist, nor echoes the client's.
            raise UnsupportedError("This server does not handle this action.")
        if not params.item_id:
            raise InvalidInputError("Actions can only come from a widget.")
        return target

    async def _action_context(
        self,
        thread_id: str,
        item_id: str | None,
        action: Action[str, Any],
        context: RequestContext,
        checked: ActionTarget | None = None,
    ) -> ActionContext:
        sender: ThreadItem | None
        if checked is not None and (checked[0].id, checked[1].id) == (thread_id, item_id):
            thread, sender = checked
        else:  # not prechecked (a caller of process_parsed alone)
            thread = await self.store.load_thread(thread_id, context)
            sender = await self.store.load_item(thread_id, item_id, context) if item_id else None
        if not isinstance(sender, WidgetItem):  # precheck refused these already
            raise InvalidInputError("Actions can only come from a widget.")
        return ActionContext(
            thread=thread,
            action=action,
            sender=sender,
            request=context,
            db=self.user_database(context),
        )

    async def _start_action(
        self,
        request: ThreadsCustomActionReq,
        context: RequestContext,
        checked: ActionTarget | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Run the handler's checks and work before the response starts (so a rejected payload
        is a 400), then stream its events the way the SDK streams a reply: items replaced or
        finished are saved as they pass."""
        params = request.params
        handler = self.plugins.actions.get(params.action.type)
        if handler is None:
            raise UnsupportedError("This server does not handle this action.")
        action_context = await self._action_context(
            params.thread_id, params.item_id, params.action, context, checked
        )
        thread_id_var.set(action_context.thread.id)
        with refusing_bad_values():
            started = handler(action_context)
            # An async generator function works too, but its checks run after the 200 is sent.
            events = await started if inspect.isawaitable(started) else started

        async def guarded() -> AsyncIterator[ThreadStreamEvent]:
            try:
                with refusing_bad_values():
                    async for event in events:
                        yield event
            except ActionRejectedError as exc:  # too late for a 400: an error event says it
                raise CustomStreamError(exc.message, allow_retry=False) from exc

        async def stream() -> AsyncGenerator[bytes, None]:
            # The stream's writes are settled (app.chat.settle), not the checks before.
            steps = streaming(context)
            async for event in self._process_events(action_context.thread, steps, guarded):
                yield b"data: " + self._serialize(event) + b"\n\n"

        return stream()

    def action(
        self,
        thread: ThreadMetadata,
        action: Action[str, Any],
        sender: WidgetItem | None,
        context: RequestContext,
    ) -> AsyncIterator[ThreadStreamEvent]:
        # Streaming actions are run by ``_start_action``; the SDK's path is never taken.
        raise UnsupportedError("This server does not handle this action.")

    async def sync_action(
        self,
        thread: ThreadMetadata,
        action: Action[str, Any],
        sender: WidgetItem | None,
        context: RequestContext,
    ) -> SyncCustomActionResponse:
        """The plugin's handler returns the sender's new widget, which is saved and sent back."""
        handler = self.plugins.sync_actions.get(action.type)
        if handler is None or sender is None:
            raise UnsupportedError("This server does not handle this action.")
        thread_id_var.set(thread.id)
        with refusing_bad_values():
            widget = await handler(
                ActionContext(
                    thread=thread,
                    action=action,
                    sender=sender,
                    request=context,
                    db=self.user_database(context),
                )
            )
        if widget is None:
            return SyncCustomActionResponse()
        updated = sender.model_copy(update={"widget": widget})
        await self.store.save_item(thread.id, updated, context)
        return SyncCustomActionResponse(updated_item=updated)
