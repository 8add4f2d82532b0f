"""Rewrites applied to every ChatKit event a reply produces, before the SDK stores or sends it.

* Assistant messages get store-generated ids. Chat Completions providers give every message
  the Agents SDK's placeholder id ``__fake_id__`` (and scripted models often reuse one id), so
  without this a second reply would overwrite the first. The mapping is kept per item from
  ``added`` to ``done`` so that the added, updated and done events of one message agree.
* Text from the model is cleaned of NUL and lone surrogates, which PostgreSQL refuses.
"""

from __future__ import annotations

from collections.abc import Callable

from agents.models.fake_id import FAKE_RESPONSES_ID
from chatkit.errors import ErrorCode
from chatkit.store import NotFoundError
from chatkit.types import (
    AssistantMessageContentPartAdded,
    AssistantMessageContentPartDone,
    AssistantMessageContentPartTextDelta,
    ErrorEvent,
    ThreadItem,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemRemovedEvent,
    ThreadItemReplacedEvent,
    ThreadItemUpdatedEvent,
    ThreadStreamEvent,
    WorkflowTaskAdded,
    WorkflowTaskUpdated,
)

from app.errors import AppError, ThreadBusyError
from app.sanitize import clean, clean_model


def _needs_own_id(item: ThreadItem) -> bool:
    return item.type == "assistant_message" or item.id == FAKE_RESPONSES_ID


class ItemIds:
    """Maps model-given item ids to store ids for the items of one reply."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self._new_id = new_id
        self._open: dict[str, str] = {}

    def apply(self, event: ThreadStreamEvent) -> ThreadStreamEvent:
        if isinstance(event, ThreadItemUpdatedEvent):
            # Per token (checked first): the event is freshly made by the converter, so it is
            # updated in place.
            own = self._open.get(event.item_id)
            if own is not None:
                event.item_id = own
            return event
        if isinstance(event, ThreadItemAddedEvent) and _needs_own_id(event.item):
            own = self._new_id()
            self._open[event.item.id] = own
            return ThreadItemAddedEvent(item=event.item.model_copy(update={"id": own}))
        if isinstance(event, ThreadItemDoneEvent | ThreadItemReplacedEvent) and _needs_own_id(
            event.item
        ):
            own = self._open.pop(event.item.id, "") or self._new_id()
            return type(event)(item=event.item.model_copy(update={"id": own}))
        if isinstance(event, ThreadItemRemovedEvent) and event.item_id in self._open:
            return ThreadItemRemovedEvent(item_id=self._open.pop(event.item_id))
        return event


def clean_event(event: ThreadStreamEvent) -> ThreadStreamEvent:
    """The event with model text made storable (cheap checks on the per-token path)."""
    if isinstance(event, ThreadItemUpdatedEvent):
        update = event.update
        if isinstance(update, AssistantMessageContentPartTextDelta):
            delta = clean(update.delta)
            if delta is not update.delta:
                return event.model_copy(
                    update={"update": update.model_copy(update={"delta": delta})}
                )
            return event
        if isinstance(
            update,
            AssistantMessageContentPartAdded
            | AssistantMessageContentPartDone
            | WorkflowTaskAdded
            | WorkflowTaskUpdated,
        ):
            return clean_model(event)
        return event
    if isinstance(event, ThreadItemAddedEvent | ThreadItemDoneEvent | ThreadItemReplacedEvent):
        return clean_model(event)
    return event


def error_event_for(exc: BaseException) -> ErrorEvent:
    """A user-safe ChatKit error event; the exception itself goes only to the log."""
    if isinstance(exc, NotFoundError):
        return ErrorEvent(code="custom", message="Not found.", allow_retry=False)
    if isinstance(exc, ThreadBusyError):
        return ErrorEvent(code="custom", message=exc.message, allow_retry=True)
    if isinstance(exc, AppError) and exc.status_code < 500:
        return ErrorEvent(code="custom", message=exc.message, allow_retry=False)
    return ErrorEvent(code=ErrorCode.STREAM_ERROR, allow_retry=True)


def error_chunk(exc: BaseException) -> bytes:
    payload = error_event_for(exc).model_dump_json(by_alias=True, exclude_none=True)
    return b"data: " + payload.encode() + b"\n\n"
