"""Storing what a lost run had streamed (app.chat.runs): its process died (SIGKILL, an OOM kill)
before it could store the partial reply, and a resumer declared the run lost.

The run's logged events say everything the client saw that was logged: the items added and not
yet done (the SDK stores an item when it is done, so those are exactly what died with the
process), with every update applied. They are stored as a disconnect stores a cut reply: the
non-empty assistant messages, then the SDK's "cancelled" marker, so that the next reply in the
thread does not try to continue the lost one (``ChatKitServer.handle_stream_cancelled``). The
items keep the ids the client saw. A run that had nothing pending (its reply was complete and
stored, or no reply had started) stores nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from chatkit.types import (
    ThreadCreatedEvent,
    ThreadItem,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemRemovedEvent,
    ThreadItemUpdatedEvent,
    ThreadStreamEvent,
)
from pydantic import TypeAdapter, ValidationError

from app.chat.server import ChatKitPgServer
from app.context import RequestContext

log = logging.getLogger(__name__)

EVENT = TypeAdapter[ThreadStreamEvent](ThreadStreamEvent)


def event_of(block: str) -> ThreadStreamEvent | None:
    """The ChatKit event of a logged SSE block; None for anything else."""
    data = "\n".join(line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:"))
    try:
        return EVENT.validate_json(data) if data else None
    except ValidationError:
        return None


def pending_items(
    server: ChatKitPgServer, blocks: Sequence[str]
) -> tuple[str | None, list[ThreadItem]]:
    """The run's thread and the items it had added and not finished, as the SDK tracks them."""
    thread_id: str | None = None
    pending: dict[str, ThreadItem] = {}
    for block in blocks:
        event = event_of(block)
        if isinstance(event, ThreadCreatedEvent):
            thread_id = event.thread.id
        elif isinstance(event, ThreadItemAddedEvent):
            pending[event.item.id] = event.item
            thread_id = event.item.thread_id
        elif isinstance(event, ThreadItemDoneEvent):
            pending.pop(event.item.id, None)
            thread_id = event.item.thread_id
        elif isinstance(event, ThreadItemRemovedEvent):
            pending.pop(event.item_id, None)
        elif isinstance(event, ThreadItemUpdatedEvent):
            server._update_pending_items(pending, event)
    return thread_id, list(pending.values())


async def store_lost_reply(server: ChatKitPgServer, user_id: str, blocks: Sequence[str]) -> None:
    """Store the partial reply of a lost run and the cancel marker (see the module's doc)."""
    thread_id, items = pending_items(server, blocks)
    if thread_id is None or not items:
        return
    context = RequestContext(user_id=user_id)
    thread = await server.store.load_thread(thread_id, context)
    await server.handle_stream_cancelled(thread, items, context)
    log.info("partial reply of a lost run stored", extra={"events": len(blocks)})
