"""A ``Store`` wrapper that times every call into the ``chatkit_store_call_duration_seconds``
histogram; the wrapped store does the work. Anything else is delegated unchanged."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from chatkit.store import Store, StoreItemType
from chatkit.types import Attachment, FeedbackKind, Page, ThreadItem, ThreadMetadata
from prometheus_client import Histogram

from app.context import RequestContext

_METHODS = (
    "load_thread",
    "save_thread",
    "load_threads",
    "delete_thread",
    "load_thread_items",
    "add_thread_item",
    "save_item",
    "load_item",
    "delete_thread_item",
    "save_attachment",
    "load_attachment",
    "delete_attachment",
    "save_feedback",
    "load_feedback",
)


class MeteredStore(Store[RequestContext]):
    def __init__(self, inner: Store[Any], histogram: Histogram) -> None:
        self.inner = inner
        self._observe = {m: histogram.labels(m).observe for m in _METHODS}

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this class does not define (store-specific extras).
        return getattr(self.inner, name)

    def generate_thread_id(self, context: RequestContext) -> str:
        return self.inner.generate_thread_id(context)

    def generate_item_id(
        self, item_type: StoreItemType, thread: ThreadMetadata, context: RequestContext
    ) -> str:
        return self.inner.generate_item_id(item_type, thread, context)

    async def load_thread(self, thread_id: str, context: RequestContext) -> ThreadMetadata:
        t = time.perf_counter()
        try:
            return await self.inner.load_thread(thread_id, context)
        finally:
            self._observe["load_thread"](time.perf_counter() - t)

    async def save_thread(self, thread: ThreadMetadata, context: RequestContext) -> None:
        t = time.perf_counter()
        try:
            await self.inner.save_thread(thread, context)
        finally:
            self._observe["save_thread"](time.perf_counter() - t)

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: RequestContext
    ) -> Page[ThreadMetadata]:
        t = time.perf_counter()
        try:
            return await self.inner.load_threads(limit, after, order, context)
        finally:
            self._observe["load_threads"](time.perf_counter() - t)

    async def delete_thread(self, thread_id: str, context: RequestContext) -> None:
        t = time.perf_counter()
        try:
            await self.inner.delete_thread(thread_id, context)
        finally:
            self._observe["delete_thread"](time.perf_counter() - t)

    async def load_thread_items(
        self,
        thread_id: str,
        after: str | None,
        limit: int,
        order: str,
        context: RequestContext,
    ) -> Page[ThreadItem]:
        t = time.perf_counter()
        try:
            return await self.inner.load_thread_items(thread_id, after, limit, order, context)
        finally:
            self._observe["load_thread_items"](time.perf_counter() - t)

    async def add_thread_item(
        self, thread_id: str, item: ThreadItem, context: RequestContext
    ) -> None:
        t = time.perf_counter()
        try:
            await self.inner.add_thread_item(thread_id, item, context)
        finally:
            self._observe["add_thread_item"](time.perf_counter() - t)

    async def save_item(self, thread_id: str, item: ThreadItem, context: RequestContext) -> None:
        t = time.perf_counter()
        try:
            await self.inner.save_item(thread_id, item, context)
        finally:
            self._observe["save_item"](time.perf_counter() - t)

    async def load_item(self, thread_id: str, item_id: str, context: RequestContext) -> ThreadItem:
        t = time.perf_counter()
        try:
            return await self.inner.load_item(thread_id, item_id, context)
        finally:
            self._observe["load_item"](time.perf_counter() - t)

    async def delete_thread_item(
        self, thread_id: str, item_id: str, context: RequestContext
    ) -> None:
        t = time.perf_counter()
        try:
            await self.inner.delete_thread_item(thread_id, item_id, context)
        finally:
            self._observe["delete_thread_item"](time.perf_counter() - t)

    async def save_attachment(self, attachment: Attachment, context: RequestContext) -> None:
        t = time.perf_counter()
        try:
            await self.inner.save_attachment(attachment, context)
        finally:
            self._observe["save_attachment"](time.perf_counter() - t)

    async def load_attachment(self, attachment_id: str, context: RequestContext) -> Attachment:
        t = time.perf_counter()
        try:
            return await self.inner.load_attachment(attachment_id, context)
        finally:
            self._observe["load_attachment"](time.perf_counter() - t)

    async def delete_attachment(self, attachment_id: str, context: RequestContext) -> None:
        t = time.perf_counter()
        try:
            await self.inner.delete_attachment(attachment_id, context)
        finally:
            self._observe["delete_attachment"](time.perf_counter() - t)

    async def save_feedback(
        self,
        thread_id: str,
        item_ids: Sequence[str],
        kind: FeedbackKind,
        context: RequestContext,
    ) -> None:
        t = time.perf_counter()
        try:
            await self.inner.save_feedback(thread_id, item_ids, kind, context)  # type: ignore[attr-defined]
        finally:
            self._observe["save_feedback"](time.perf_counter() - t)

    async def load_feedback(self, thread_id: str, context: RequestContext) -> dict[str, str]:
        t = time.perf_counter()
        try:
            result: dict[str, str] = await self.inner.load_feedback(thread_id, context)  # type: ignore[attr-defined]
            return result
        finally:
            self._observe["load_feedback"](time.perf_counter() - t)
