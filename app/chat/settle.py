"""The writes of a reply are settled before the client is told how they went.

A statement the database received but never answered (a stalled server: SIGSTOP, a hung disk,
a network that lost the answer) may still commit once the server resumes, after asyncpg's
command timeout has given up on it. A stream that reported that failure (an ``error`` event,
"retry") then showed the user a reply as failed that the thread keeps: measured with a frozen
PostgreSQL, the stale ``INSERT`` commits the moment the server is resumed.

The item writes are idempotent (the same item added again is harmless; deleting a missing item
is a no-op; replacing and saving a thread are upserts), so ``SettledWrites`` tries one whose
outcome is unknown (the pool gave up on its connection mid-statement: ``abandoned_here``)
again until a try succeeds (the item is then stored, whatever the first did), for up to
``SAVE_RETRY_SECONDS``. A failure that certainly did nothing (no connection to be had: the
server down or refusing) is reported at once, as before. Past that the error stands, and an item that may have been added
after all is taken back in the background once the database answers: after every backend the
pool gave up on has ended (``ConnectionPool.fence``), so a late commit cannot outlive the error
the client was shown. (A replaced item or a workflow, which existed before, is left as it is.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

from chatkit.store import Store, StoreItemType
from chatkit.types import Attachment, FeedbackKind, Page, ThreadItem, ThreadMetadata

from app.background import TaskRegistry
from app.errors import ServiceUnavailableError
from app.pg.pool import ConnectionPool, abandoned_here

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 0.1
MAX_RETRY_GAP_SECONDS = 2.0
UNDO_WITHIN_SECONDS = 900.0
"""How long the background undo of an unsettled add keeps waiting for the database."""
FENCE_SECONDS = 10.0


_settling: ContextVar[bool] = ContextVar("settle_writes", default=False)


def settle_writes_here() -> None:
    """Writes from here on in this context (a stream about to start: its client learns how
    they went only later, in the stream) are settled. A plain request's failed write stays a
    503 at once: its client knows it failed and may send it again."""
    _settling.set(True)


class SettledWrites(Store[Any]):
    """``inner`` with its writes of items and threads retried while their outcome is unknown
    (see the module). Anything else is ``inner``'s, unchanged."""

    def __init__(self, inner: Store[Any], *, tasks: TaskRegistry, retry_seconds: float) -> None:
        self.inner = inner
        self._tasks = tasks
        self._retry_seconds = retry_seconds
        pool = getattr(inner, "pool", None)
        self._pool = pool if isinstance(pool, ConnectionPool) else None

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this class does not define (store-specific extras).
        return getattr(self.inner, name)

    # --- the writes ------------------------------------------------------------------------

    async def _settle(self, write: Callable[[], Awaitable[None]]) -> None:
        """Run ``write``. A failure whose outcome is unknown (the pool gave up on the call's
        connection mid-statement) is followed by more tries, until one succeeds or the
        retries are over (then the last failure is raised). A failure that certainly did
        nothing (no connection could be had) is raised at once."""
        before = abandoned_here()
        try:
            await write()
            return
        except ServiceUnavailableError as exc:
            if not _settling.get() or self._retry_seconds <= 0 or abandoned_here() == before:
                raise
            failure = exc
            cause = exc.__cause__
            log.warning(
                "store write failed, retrying",
                extra={"reason": type(cause).__name__ if cause else type(exc).__name__},
            )
        deadline = time.monotonic() + self._retry_seconds
        gap = FIRST_RETRY_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(gap, left))
            gap = min(gap * 2, MAX_RETRY_GAP_SECONDS)
            try:
                await write()
            except ServiceUnavailableError as exc:
                failure = exc
                continue
            log.info("store write settled")
            return
        raise failure

    async def add_thread_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        before = abandoned_here()
        try:
            await self._settle(lambda: self.inner.add_thread_item(thread_id, item, context))
        except ServiceUnavailableError:
            # Still unknown (not a failure that did nothing); a workflow adds itself again,
            # it existed before.
            if _settling.get() and abandoned_here() != before and item.type != "workflow":
                self._undo_later(thread_id, item.id, context)
            raise

    async def save_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        await self._settle(lambda: self.inner.save_item(thread_id, item, context))

    async def delete_thread_item(self, thread_id: str, item_id: str, context: Any) -> None:
        await self._settle(lambda: self.inner.delete_thread_item(thread_id, item_id, context))

    async def save_thread(self, thread: ThreadMetadata, context: Any) -> None:
        await self._settle(lambda: self.inner.save_thread(thread, context))

    def _undo_later(self, thread_id: str, item_id: str, context: Any) -> None:
        if self._pool is None:
            return  # not our pool: nothing known of what it gave up on
        self._tasks.spawn(self._undo(self._pool, thread_id, item_id, context), name="undo-add")

    async def _undo(self, pool: ConnectionPool, thread_id: str, item_id: str, context: Any) -> None:
        """The client was told this add failed: once the database answers, and once no backend
        the pool gave up on can commit any more, the item is removed if it landed."""
        deadline = time.monotonic() + UNDO_WITHIN_SECONDS
        gap = FIRST_RETRY_SECONDS
        while True:
            try:
                async with asyncio.timeout(FENCE_SECONDS):
                    await pool.fence()
                await self.inner.delete_thread_item(thread_id, item_id, context)
            except Exception as exc:
                if time.monotonic() > deadline:
                    log.warning(
                        "a failed add was not checked: the database stayed away",
                        extra={"reason": type(exc).__name__, "item_id": item_id},
                    )
                    return
                await asyncio.sleep(gap)
                gap = min(gap * 2, MAX_RETRY_GAP_SECONDS)
                continue
            log.info(
                "failed add checked and taken back if it had landed", extra={"item_id": item_id}
            )
            return

    # --- everything else: the inner store's ---------------------------------------------------

    def generate_thread_id(self, context: Any) -> str:
        return self.inner.generate_thread_id(context)

    def generate_item_id(
        self, item_type: StoreItemType, thread: ThreadMetadata, context: Any
    ) -> str:
        return self.inner.generate_item_id(item_type, thread, context)

    # Feedback is written by plain requests only (never retried), but is defined here all the
    # same: since Python 3.12 a runtime protocol check (``isinstance``) does not see what
    # ``__getattr__`` forwards, so a store's optional methods must be real ones.
    async def save_feedback(
        self, thread_id: str, item_ids: Sequence[str], kind: FeedbackKind, context: Any
    ) -> None:
        await self.inner.save_feedback(thread_id, item_ids, kind, context)  # type: ignore[attr-defined]

    async def load_feedback(self, thread_id: str, context: Any) -> dict[str, str]:
        return await self.inner.load_feedback(thread_id, context)  # type: ignore[attr-defined, no-any-return]

    async def load_thread(self, thread_id: str, context: Any) -> ThreadMetadata:
        return await self.inner.load_thread(thread_id, context)

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: Any
    ) -> Page[ThreadMetadata]:
        return await self.inner.load_threads(limit, after, order, context)

    async def delete_thread(self, thread_id: str, context: Any) -> None:
        await self.inner.delete_thread(thread_id, context)

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, context: Any
    ) -> Page[ThreadItem]:
        return await self.inner.load_thread_items(thread_id, after, limit, order, context)

    async def load_item(self, thread_id: str, item_id: str, context: Any) -> ThreadItem:
        return await self.inner.load_item(thread_id, item_id, context)

    async def save_attachment(self, attachment: Attachment, context: Any) -> None:
        await self.inner.save_attachment(attachment, context)

    async def load_attachment(self, attachment_id: str, context: Any) -> Attachment:
        return await self.inner.load_attachment(attachment_id, context)

    async def delete_attachment(self, attachment_id: str, context: Any) -> None:
        await self.inner.delete_attachment(attachment_id, context)
