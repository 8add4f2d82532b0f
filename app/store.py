"""``PostgresStore``: the ChatKit ``Store`` over PostgreSQL.

Each call borrows one pooled connection from the SQLAlchemy engine and speaks asyncpg directly
on it (prepared statements, one round trip for the common paths), so a store call costs close
to the raw driver while the engine keeps owning the pool. Every statement filters by the user
taken from the request context: another user's row is indistinguishable from a missing one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import asyncpg
from chatkit.store import NotFoundError, Store, StoreItemType
from chatkit.types import (
    Attachment,
    FeedbackKind,
    Page,
    Thread,
    ThreadItem,
    ThreadMetadata,
    UserMessageItem,
)
from pydantic import BaseModel, TypeAdapter
from sqlalchemy.ext.asyncio import AsyncEngine

from .errors import InvalidInputError, MissingUserError
from .ids import new_id

MAX_PAGE_SIZE = 500

_ITEM = TypeAdapter[ThreadItem](ThreadItem)
_ATTACHMENT = TypeAdapter[Attachment](Attachment)

T = TypeVar("T")

AttachmentHook = Callable[[Attachment, str], Attachment]
"""Rewrites an attachment on its way out of the store, given the user it is loaded for."""


def user_id_of(context: Any) -> str:
    """The user a call acts for: ``context.user_id`` or ``context["user_id"]``."""
    user_id = getattr(context, "user_id", None)
    if user_id is None and isinstance(context, Mapping):
        user_id = context.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        raise MissingUserError("store called without a user_id in its context")
    return user_id


def _ts(value: datetime) -> datetime:
    """Column value for ordering; naive datetimes (the SDK's ``datetime.now()``) count as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _dump(model: BaseModel, *, exclude: set[str] | None = None) -> str:
    return model.model_dump_json(by_alias=True, exclude=exclude)


def _order(order: str) -> Literal["asc", "desc"]:
    if order not in ("asc", "desc"):
        raise InvalidInputError("order must be 'asc' or 'desc'")
    return order  # type: ignore[return-value]


def _limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InvalidInputError("limit must be a positive integer")
    return min(limit, MAX_PAGE_SIZE)


@dataclass(frozen=True)
class _PageSQL:
    first: str
    after: str
    exists: str


def _page_sql(table: str, scope: str, nscope: int, order: Literal["asc", "desc"]) -> _PageSQL:
    """Keyset queries on (created_at, seq): an index range scan whatever the page depth.

    ``scope`` filters columns $1..$nscope; the cursor id and the limit follow. Only constant
    table and column names are interpolated (built once at import); values are always bound.
    """
    cmp, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
    cursor = f"${nscope + 1}"
    limit = f"${nscope + 2}"
    cols = scope.split(",")
    where = " AND ".join(f"{c} = ${i + 1}" for i, c in enumerate(cols))
    order_by = f"created_at {direction}, seq {direction}"
    return _PageSQL(
        first=f"SELECT id, data::text FROM {table} WHERE {where} ORDER BY {order_by} LIMIT {cursor}",
        # LATERAL pins the cursor row first, so the page is a parameterised range scan.
        after=(
            f"SELECT p.id, p.data FROM (SELECT created_at, seq FROM {table} "
            f"WHERE {where} AND id = {cursor}) c CROSS JOIN LATERAL ("
            f"SELECT id, data::text AS data, created_at, seq FROM {table} WHERE {where} "
            f"AND (created_at, seq) {cmp} (c.created_at, c.seq) "
            f"ORDER BY {order_by} LIMIT {limit}) p ORDER BY p.{order_by.replace(', ', ', p.')}"
        ),
        exists=f"SELECT 1 FROM {table} WHERE {where} AND id = {cursor}",
    )


_THREAD_PAGES = {o: _page_sql("chatkit_threads", "user_id", 1, o) for o in ("asc", "desc")}
_ITEM_PAGES = {o: _page_sql("chatkit_items", "user_id,thread_id", 2, o) for o in ("asc", "desc")}

SQL_LOAD_THREAD = "SELECT data::text FROM chatkit_threads WHERE user_id = $1 AND id = $2"
SQL_SAVE_THREAD = (
    "INSERT INTO chatkit_threads AS t (user_id, id, created_at, title, data) "
    "VALUES ($1, $2, $3, $4, $5::jsonb) "
    "ON CONFLICT (user_id, id) DO UPDATE SET created_at = EXCLUDED.created_at, "
    "title = EXCLUDED.title, data = EXCLUDED.data, updated_at = now()"
)
SQL_DELETE_THREAD = "DELETE FROM chatkit_threads WHERE user_id = $1 AND id = $2"
SQL_UPSERT_ITEM = (
    "INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data) "
    "VALUES ($1, $2, $3, $4, $5, $6::jsonb) "
    "ON CONFLICT (user_id, thread_id, id) DO UPDATE SET created_at = EXCLUDED.created_at, "
    "type = EXCLUDED.type, data = EXCLUDED.data"
)
SQL_LOAD_ITEM = (
    "SELECT data::text FROM chatkit_items WHERE user_id = $1 AND thread_id = $2 AND id = $3"
)
SQL_DELETE_ITEM = "DELETE FROM chatkit_items WHERE user_id = $1 AND thread_id = $2 AND id = $3"
SQL_SAVE_ATTACHMENT = (
    "INSERT INTO chatkit_attachments (user_id, id, thread_id, data) "
    "VALUES ($1, $2, $3, $4::jsonb) "
    "ON CONFLICT (user_id, id) DO UPDATE SET thread_id = EXCLUDED.thread_id, data = EXCLUDED.data"
)
SQL_LOAD_ATTACHMENT = "SELECT data::text FROM chatkit_attachments WHERE user_id = $1 AND id = $2"
SQL_DELETE_ATTACHMENT = "DELETE FROM chatkit_attachments WHERE user_id = $1 AND id = $2"
SQL_SAVE_FEEDBACK = (
    "INSERT INTO chatkit_feedback (user_id, thread_id, item_id, kind) "
    "SELECT $1, $2, ids.id, $4 FROM unnest($3::text[]) AS ids(id) "
    "ON CONFLICT (user_id, thread_id, item_id) DO UPDATE SET kind = EXCLUDED.kind, "
    "created_at = now()"
)
SQL_LOAD_FEEDBACK = (
    "SELECT item_id, kind FROM chatkit_feedback WHERE user_id = $1 AND thread_id = $2 "
    "ORDER BY item_id"
)


class PostgresStore(Store[Any]):
    """A ``chatkit.store.Store`` whose every call is one short statement or transaction."""

    def __init__(
        self, engine: AsyncEngine, *, attachment_hook: AttachmentHook | None = None
    ) -> None:
        self.engine = engine
        # Applied to every attachment loaded, including those embedded in user messages, so
        # that time-limited links (signed preview URLs, see app.attachments) are fresh.
        self.attachment_hook = attachment_hook

    # --- plumbing -----------------------------------------------------------------------

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """Borrow a pooled asyncpg connection; it goes back as soon as the call is done."""
        async with self.engine.connect() as sa_conn:
            fairy = await sa_conn.get_raw_connection()
            conn = fairy.driver_connection
            assert conn is not None
            try:
                yield conn
            except (
                asyncpg.UntranslatableCharacterError,
                asyncpg.CharacterNotInRepertoireError,
                UnicodeEncodeError,
            ) as exc:
                raise InvalidInputError(
                    "Text may not contain NUL characters or unpaired surrogates."
                ) from exc

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        async with self.connection() as conn:
            return await conn.fetchval(sql, *args)

    async def _execute(self, sql: str, *args: Any) -> str:
        async with self.connection() as conn:
            try:
                result: str = await conn.execute(sql, *args)
            except asyncpg.ForeignKeyViolationError as exc:
                # The parent row is missing, or it is another user's: both read as "not found".
                raise NotFoundError("parent not found") from exc
            return result

    async def _page(
        self,
        sqls: _PageSQL,
        scope: Sequence[str],
        after: str | None,
        limit: int,
        decode: Any,
    ) -> Page[Any]:
        n = _limit(limit)
        async with self.connection() as conn:
            if after is None:
                rows = await conn.fetch(sqls.first, *scope, n + 1)
            else:
                rows = await conn.fetch(sqls.after, *scope, after, n + 1)
                if not rows and await conn.fetchval(sqls.exists, *scope, after) is None:
                    raise NotFoundError("cursor not found")
        has_more = len(rows) > n
        rows = rows[:n]
        return Page(
            data=[decode(r[1]) for r in rows],
            has_more=has_more,
            after=rows[-1][0] if rows else None,
        )

    # --- ids ----------------------------------------------------------------------------

    def generate_thread_id(self, context: Any) -> str:
        return new_id("thread")

    def generate_item_id(
        self, item_type: StoreItemType, thread: ThreadMetadata, context: Any
    ) -> str:
        return new_id(item_type)

    # --- threads ------------------------------------------------------------------------

    async def load_thread(self, thread_id: str, context: Any) -> ThreadMetadata:
        data = await self._fetchval(SQL_LOAD_THREAD, user_id_of(context), thread_id)
        if data is None:
            raise NotFoundError(f"Thread {thread_id} not found")
        return ThreadMetadata.model_validate_json(data)

    async def save_thread(self, thread: ThreadMetadata, context: Any) -> None:
        exclude = {"items"} if isinstance(thread, Thread) else None
        await self._execute(
            SQL_SAVE_THREAD,
            user_id_of(context),
            thread.id,
            _ts(thread.created_at),
            thread.title,
            _dump(thread, exclude=exclude),
        )

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: Any
    ) -> Page[ThreadMetadata]:
        return await self._page(
            _THREAD_PAGES[_order(order)],
            (user_id_of(context),),
            after,
            limit,
            ThreadMetadata.model_validate_json,
        )

    async def delete_thread(self, thread_id: str, context: Any) -> None:
        """Items, feedback, attachments and their bytes go with the thread (ON DELETE CASCADE)."""
        status = await self._execute(SQL_DELETE_THREAD, user_id_of(context), thread_id)
        if status == "DELETE 0":
            raise NotFoundError(f"Thread {thread_id} not found")

    # --- items --------------------------------------------------------------------------

    def _fresh(self, item: ThreadItem, user_id: str) -> ThreadItem:
        hook = self.attachment_hook
        if hook is None or not isinstance(item, UserMessageItem) or not item.attachments:
            return item
        return item.model_copy(update={"attachments": [hook(a, user_id) for a in item.attachments]})

    async def load_thread_items(
        self,
        thread_id: str,
        after: str | None,
        limit: int,
        order: str,
        context: Any,
    ) -> Page[ThreadItem]:
        user_id = user_id_of(context)
        page: Page[ThreadItem] = await self._page(
            _ITEM_PAGES[_order(order)],
            (user_id, thread_id),
            after,
            limit,
            _ITEM.validate_json,
        )
        if self.attachment_hook is not None:
            page.data = [self._fresh(item, user_id) for item in page.data]
        return page

    async def add_thread_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        """Idempotent: adding the same id again leaves one row holding the latest content."""
        await self.save_item(thread_id, item, context)

    async def save_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        await self._execute(
            SQL_UPSERT_ITEM,
            user_id_of(context),
            thread_id,
            item.id,
            _ts(item.created_at),
            item.type,
            _dump(item),
        )

    async def load_item(self, thread_id: str, item_id: str, context: Any) -> ThreadItem:
        user_id = user_id_of(context)
        data = await self._fetchval(SQL_LOAD_ITEM, user_id, thread_id, item_id)
        if data is None:
            raise NotFoundError(f"Item {item_id} not found")
        return self._fresh(_ITEM.validate_json(data), user_id)

    async def delete_thread_item(self, thread_id: str, item_id: str, context: Any) -> None:
        """Deleting an item that is not there is a no-op: the SDK removes unsaved items too."""
        await self._execute(SQL_DELETE_ITEM, user_id_of(context), thread_id, item_id)

    # --- attachments --------------------------------------------------------------------

    async def save_attachment(self, attachment: Attachment, context: Any) -> None:
        await self._execute(
            SQL_SAVE_ATTACHMENT,
            user_id_of(context),
            attachment.id,
            attachment.thread_id,
            _dump(attachment),
        )

    async def load_attachment(self, attachment_id: str, context: Any) -> Attachment:
        user_id = user_id_of(context)
        data = await self._fetchval(SQL_LOAD_ATTACHMENT, user_id, attachment_id)
        if data is None:
            raise NotFoundError(f"Attachment {attachment_id} not found")
        attachment = _ATTACHMENT.validate_json(data)
        hook = self.attachment_hook
        return attachment if hook is None else hook(attachment, user_id)

    async def delete_attachment(self, attachment_id: str, context: Any) -> None:
        status = await self._execute(SQL_DELETE_ATTACHMENT, user_id_of(context), attachment_id)
        if status == "DELETE 0":
            raise NotFoundError(f"Attachment {attachment_id} not found")

    # --- feedback -----------------------------------------------------------------------

    async def save_feedback(
        self, thread_id: str, item_ids: Sequence[str], kind: FeedbackKind, context: Any
    ) -> None:
        """Record feedback on items; sending it again for an item replaces the earlier kind."""
        if kind not in ("positive", "negative"):
            raise InvalidInputError("feedback kind must be 'positive' or 'negative'")
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return
        await self._execute(SQL_SAVE_FEEDBACK, user_id_of(context), thread_id, ids, kind)

    async def load_feedback(self, thread_id: str, context: Any) -> dict[str, str]:
        async with self.connection() as conn:
            rows = await conn.fetch(SQL_LOAD_FEEDBACK, user_id_of(context), thread_id)
        return {r["item_id"]: r["kind"] for r in rows}
