"""A plain in-memory ``Store`` (dicts and lists), the baseline the Postgres store is compared
with in the server benchmark. Same contract as ``PostgresStore`` (user-scoped, upserts,
keyset pages in (created_at, insertion) order, feedback), none of its durability."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from chatkit.store import NotFoundError, Store, StoreItemType
from chatkit.types import Attachment, FeedbackKind, Page, Thread, ThreadItem, ThreadMetadata

from app.ids import new_id
from app.pg.store import MAX_PAGE_SIZE, user_id_of


def _key(created_at: datetime, seq: int) -> tuple[datetime, int]:
    return (created_at.replace(tzinfo=UTC) if created_at.tzinfo is None else created_at, seq)


class MemoryStore(Store[Any]):
    def __init__(self) -> None:
        self._seq = itertools.count()
        # user -> thread id -> (sort key, metadata)
        self._threads: dict[str, dict[str, tuple[tuple[datetime, int], ThreadMetadata]]] = {}
        # (user, thread) -> item id -> (sort key, item)
        self._items: dict[tuple[str, str], dict[str, tuple[tuple[datetime, int], ThreadItem]]] = {}
        self._attachments: dict[tuple[str, str], Attachment] = {}
        self._feedback: dict[tuple[str, str], dict[str, str]] = {}

    def generate_thread_id(self, context: Any) -> str:
        return new_id("thread")

    def generate_item_id(
        self, item_type: StoreItemType, thread: ThreadMetadata, context: Any
    ) -> str:
        return new_id(item_type)

    @staticmethod
    def _page(
        rows: dict[str, tuple[tuple[datetime, int], Any]], after: str | None, limit: int, order: str
    ) -> Page[Any]:
        ordered = sorted(rows.items(), key=lambda kv: kv[1][0], reverse=order == "desc")
        start = 0
        if after is not None:
            ids = [k for k, _ in ordered]
            if after not in rows:
                raise NotFoundError("cursor not found")
            start = ids.index(after) + 1
        n = min(limit, MAX_PAGE_SIZE)
        chunk = ordered[start : start + n]
        return Page(
            data=[v[1] for _, v in chunk],
            has_more=start + n < len(ordered),
            after=chunk[-1][0] if chunk else None,
        )

    async def load_thread(self, thread_id: str, context: Any) -> ThreadMetadata:
        row = self._threads.get(user_id_of(context), {}).get(thread_id)
        if row is None:
            raise NotFoundError(thread_id)
        return row[1].model_copy(deep=True)

    async def save_thread(self, thread: ThreadMetadata, context: Any) -> None:
        threads = self._threads.setdefault(user_id_of(context), {})
        meta = (
            ThreadMetadata(**thread.model_dump(exclude={"items"}))
            if isinstance(thread, Thread)
            else thread
        )
        old = threads.get(thread.id)
        key = old[0] if old else _key(thread.created_at, next(self._seq))
        threads[thread.id] = (key, meta.model_copy(deep=True))

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: Any
    ) -> Page[ThreadMetadata]:
        return self._page(self._threads.get(user_id_of(context), {}), after, limit, order)

    async def delete_thread(self, thread_id: str, context: Any) -> None:
        user = user_id_of(context)
        if self._threads.get(user, {}).pop(thread_id, None) is None:
            raise NotFoundError(thread_id)
        self._items.pop((user, thread_id), None)
        self._feedback.pop((user, thread_id), None)

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, context: Any
    ) -> Page[ThreadItem]:
        return self._page(
            self._items.get((user_id_of(context), thread_id), {}), after, limit, order
        )

    async def add_thread_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        await self.save_item(thread_id, item, context)

    async def save_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        user = user_id_of(context)
        if thread_id not in self._threads.get(user, {}):
            raise NotFoundError(thread_id)
        items = self._items.setdefault((user, thread_id), {})
        old = items.get(item.id)
        key = _key(item.created_at, old[0][1] if old else next(self._seq))
        items[item.id] = (key, item.model_copy(deep=True))

    async def load_item(self, thread_id: str, item_id: str, context: Any) -> ThreadItem:
        row = self._items.get((user_id_of(context), thread_id), {}).get(item_id)
        if row is None:
            raise NotFoundError(item_id)
        return row[1].model_copy(deep=True)

    async def delete_thread_item(self, thread_id: str, item_id: str, context: Any) -> None:
        self._items.get((user_id_of(context), thread_id), {}).pop(item_id, None)

    async def save_attachment(self, attachment: Attachment, context: Any) -> None:
        self._attachments[(user_id_of(context), attachment.id)] = attachment.model_copy(deep=True)

    async def load_attachment(self, attachment_id: str, context: Any) -> Attachment:
        attachment = self._attachments.get((user_id_of(context), attachment_id))
        if attachment is None:
            raise NotFoundError(attachment_id)
        return attachment

    async def delete_attachment(self, attachment_id: str, context: Any) -> None:
        if self._attachments.pop((user_id_of(context), attachment_id), None) is None:
            raise NotFoundError(attachment_id)

    async def save_feedback(
        self, thread_id: str, item_ids: Sequence[str], kind: FeedbackKind, context: Any
    ) -> None:
        user = user_id_of(context)
        items = self._items.get((user, thread_id), {})
        if any(i not in items for i in item_ids):
            raise NotFoundError("item not found")
        self._feedback.setdefault((user, thread_id), {}).update(dict.fromkeys(item_ids, kind))

    async def load_feedback(self, thread_id: str, context: Any) -> dict[str, str]:
        return dict(self._feedback.get((user_id_of(context), thread_id), {}))
