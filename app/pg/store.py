"""``PostgresStore``: the ChatKit ``Store`` over PostgreSQL.

Each call borrows one connection from the app's asyncpg pool (app.pg.pool) and runs one prepared
statement on it (one round trip for the common paths), so a store call costs close to the raw
driver. Every statement filters by the user taken from the request context: another user's
row is indistinguishable from a missing one. Every statement also sets ``app.user_id`` for
PostgreSQL's row-level security policies, a second wall behind those filters (app.pg.sql says how
the statements are shaped for it and for Citus; docs/rls.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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

from app.context import PageFold, ReadCache
from app.errors import (
    AttachmentInUseError,
    InvalidInputError,
    ItemConflictError,
    MissingUserError,
)
from app.ids import new_id
from app.pg.calls import Call, modify, on_citus
from app.pg.citus import Fetch, write_as
from app.pg.pool import ConnectionPool
from app.pg.sql import (
    _ITEM_PAGES,
    _THREAD_PAGES,
    AS_USER,
    CITUS_CALLS,
    _PageSQL,
    gated,
    gated_select,
    scoped_insert,
)

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


def _reads(context: Any) -> ReadCache | None:
    """The request's cache of rows already read (app.context.ReadCache), if it has one."""
    reads = getattr(context, "reads", None)
    return reads if isinstance(reads, ReadCache) else None


def _order(order: str) -> Literal["asc", "desc"]:
    if order not in ("asc", "desc"):
        raise InvalidInputError("order must be 'asc' or 'desc'")
    return order  # type: ignore[return-value]


def _limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InvalidInputError("limit must be a positive integer")
    return min(limit, MAX_PAGE_SIZE)


SQL_LOAD_THREAD = gated_select(
    "q.data", "SELECT data::text AS data FROM chatkit_threads WHERE user_id = $1 AND id = $2"
)
# The time of an upsert is inserted and taken from EXCLUDED rather than written as now() in
# DO UPDATE SET: the same value (the transaction's start) and the only form Citus accepts there
# (it requires IMMUTABLE functions in DO UPDATE SET; it evaluates now() in the values itself).
SQL_SAVE_THREAD = scoped_insert(
    "chatkit_threads AS t (user_id, id, created_at, title, data, updated_at)",
    "$2::text, $3::timestamptz, $4::text, $5::jsonb, now()",
    "ON CONFLICT (user_id, id) DO UPDATE SET created_at = EXCLUDED.created_at, "
    "title = EXCLUDED.title, data = EXCLUDED.data, updated_at = EXCLUDED.updated_at",
)
SQL_DELETE_THREAD = gated("DELETE FROM chatkit_threads WHERE user_id = $1 AND id = $2")
_ITEM_COLUMNS = "chatkit_items (user_id, thread_id, id, created_at, type, data)"
_ITEM_VALUES = "$2::text, $3::text, $4::timestamptz, $5::text, $6::jsonb"
_ITEM_UPDATE = (
    "ON CONFLICT (user_id, thread_id, id) DO UPDATE SET created_at = EXCLUDED.created_at, "
    "type = EXCLUDED.type, data = EXCLUDED.data"
)
SQL_UPSERT_ITEM = scoped_insert(_ITEM_COLUMNS, _ITEM_VALUES, _ITEM_UPDATE)
# add_thread_item: a new row, the same item again (a retry), or a workflow replacing itself;
# anything else under an existing id returns no row and overwrites nothing.
SQL_ADD_ITEM = scoped_insert(
    _ITEM_COLUMNS,
    _ITEM_VALUES,
    f"{_ITEM_UPDATE} WHERE chatkit_items.data = EXCLUDED.data "
    "OR (chatkit_items.type = 'workflow' AND EXCLUDED.type = 'workflow') RETURNING 1",
)
# On a cluster, the same as migration 0009's function, which Citus runs on the user's worker.
CITUS_CALLS[SQL_ADD_ITEM] = "SELECT chatkit_add_item($1, $2, $3, $4, $5, $6::jsonb)"
SQL_LOAD_ITEM = gated_select(
    "q.data",
    "SELECT data::text AS data FROM chatkit_items "
    "WHERE user_id = $1 AND thread_id = $2 AND id = $3",
)
SQL_DELETE_ITEM = gated(
    "DELETE FROM chatkit_items WHERE user_id = $1 AND thread_id = $2 AND id = $3"
)
# An attachment belongs to the first thread that sends it (the SDK saves it with that thread's
# id just before the message): saved again for that thread or while it is unsent, it is
# updated; for another thread (or to unsend it) it returns no row and nothing changes.
SQL_SAVE_ATTACHMENT = scoped_insert(
    "chatkit_attachments (user_id, id, thread_id, data)",
    "$2::text, $3::text, $4::jsonb",
    "ON CONFLICT (user_id, id) DO UPDATE SET thread_id = EXCLUDED.thread_id, data = EXCLUDED.data "
    "WHERE chatkit_attachments.thread_id IS NULL "
    "OR chatkit_attachments.thread_id = EXCLUDED.thread_id RETURNING 1",
)
SQL_LOAD_ATTACHMENT = gated_select(
    "q.data",
    "SELECT data::text AS data FROM chatkit_attachments WHERE user_id = $1 AND id = $2",
)
# Deleted (its bytes by cascade) unless a user message of its thread shows it: only messages of
# the thread it belongs to can (SQL_SAVE_ATTACHMENT), so one thread's messages are searched.
SQL_DELETE_ATTACHMENT = gated(
    "DELETE FROM chatkit_attachments WHERE user_id = $1 AND id = $2 AND (thread_id IS NULL "
    "OR NOT EXISTS (SELECT FROM chatkit_items i WHERE i.user_id = $1 "
    "AND i.thread_id = chatkit_attachments.thread_id AND i.type = 'user_message' "
    "AND i.data -> 'attachments' @> jsonb_build_array(jsonb_build_object('id', $2::text))))",
    "RETURNING 1",
)
_FEEDBACK_UPSERT = (
    "ON CONFLICT (user_id, thread_id, item_id) DO UPDATE SET kind = EXCLUDED.kind, "
    "created_at = EXCLUDED.created_at"
)
SQL_SAVE_FEEDBACK = (
    "INSERT INTO chatkit_feedback (user_id, thread_id, item_id, kind, created_at) "
    f"SELECT s.uid, $2::text, ids.id, $4::text, now() FROM {AS_USER} "
    f"CROSS JOIN unnest($3::text[]) AS ids(id) {_FEEDBACK_UPSERT}"
)
# On a cluster, one row per statement (all sent in one round trip by executemany): an insert
# from unnest() is an INSERT ... SELECT, which Citus does not route to a single shard.
CITUS_SAVE_FEEDBACK_ROW = (
    "INSERT INTO chatkit_feedback (user_id, thread_id, item_id, kind, created_at) "
    f"VALUES ($1, $2::text, $3::text, $4::text, now()) {_FEEDBACK_UPSERT}"
)
SQL_ROW_SECURITY_ACTIVE = "SELECT row_security_active('chatkit_threads')"
SQL_LOAD_FEEDBACK = gated_select(
    "q.item_id, q.kind",
    "SELECT item_id, kind FROM chatkit_feedback WHERE user_id = $1 AND thread_id = $2 "
    "ORDER BY item_id",
    "q.item_id",
)


class PostgresStore(Store[Any]):
    """A ``chatkit.store.Store`` whose every call is one short statement or transaction."""

    def __init__(
        self, pool: ConnectionPool, *, attachment_hook: AttachmentHook | None = None
    ) -> None:
        self.pool = pool
        # Applied to every attachment loaded, including those embedded in user messages, so
        # that time-limited links (signed preview URLs, see app.files.store) are fresh.
        self.attachment_hook = attachment_hook

    # --- plumbing -----------------------------------------------------------------------

    def connection(self) -> Call:
        """Borrow a pooled asyncpg connection for one call (``async with store.connection()``);
        it goes back as soon as the call is done. Driver errors come out as the app's."""
        return Call(self.pool)

    async def row_security_enforced(self) -> bool:
        """Whether PostgreSQL applies the row-level security policies to this store's role.

        False for the tables' owner, a superuser or a BYPASSRLS role (the embedded development
        server connects as a superuser), and before migration 0003: then the store's own
        ``user_id`` filters are the only wall.
        """
        async with self.connection() as conn:
            return bool(await conn.fetchval(SQL_ROW_SECURITY_ACTIVE))

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        async with self.connection() as conn:
            return await conn.fetchval(sql, *args)

    async def _execute(self, sql: str, *args: Any, fetch: Fetch = "execute") -> Any:
        async with self.connection() as conn:
            try:
                return await self.modify(conn, sql, *args, fetch=fetch)
            except asyncpg.ForeignKeyViolationError as exc:
                # The parent row is missing, or it is another user's: both read as "not found".
                raise NotFoundError("parent not found") from exc

    async def on_citus(self, conn: asyncpg.Connection) -> bool:
        """Whether the database is a Citus cluster (the extension is installed); asked once."""
        return await on_citus(self.pool, conn)

    async def modify(
        self, conn: asyncpg.Connection, sql: str, *args: Any, fetch: Fetch = "execute"
    ) -> Any:
        """Run a write built by ``gated`` or ``scoped_insert`` (app.pg.calls.modify)."""
        return await modify(self.pool, conn, sql, *args, fetch=fetch)

    async def _page(
        self,
        sqls: _PageSQL,
        scope: Sequence[str],
        after: str | None,
        limit: int,
        decode: Any,
        context: Any,
    ) -> Page[Any]:
        n = _limit(limit)
        args = (*scope, n + 1) if after is None else (*scope, after, n + 1)
        # Work the request left to this statement (``RequestContext.page_fold``: the
        # endpoint's deferred rate-limit admission), run as part of it: one round trip.
        fold: PageFold | None = getattr(context, "page_fold", None)
        if fold is not None and not fold.pending(scope[0]):
            fold = None
        async with self.connection() as conn:
            # Not on a Citus cluster: the folded work's tables need not live on the user's shard.
            if fold is not None and not await self.on_citus(conn):
                sql, extra = fold.statement(sqls, after is None)
                rows = await conn.fetch(sql, *args, *extra)
                await fold.verdict(conn, bool(rows[0]["ok"]))
                if rows[0]["id"] is None:  # the one row of an empty page
                    rows = []
            else:
                rows = await conn.fetch(sqls.first if after is None else sqls.after, *args)
            if (
                after is not None
                and not rows
                and await conn.fetchval(sqls.exists, *scope, after) is None
            ):
                raise NotFoundError("cursor not found")
        has_more = len(rows) > n
        rows = rows[:n]
        # The SDK's contract: ``after`` is the cursor for the next page, so the last page has none.
        return Page(
            data=[decode(r["data"]) for r in rows],
            has_more=has_more,
            after=rows[-1]["id"] if has_more else None,
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
        reads = _reads(context)
        data = reads.threads.get(thread_id) if reads is not None else None
        if data is None:
            data = await self._fetchval(SQL_LOAD_THREAD, user_id_of(context), thread_id)
            if data is None:
                raise NotFoundError(f"Thread {thread_id} not found")
            if reads is not None:
                reads.threads[thread_id] = data
        return ThreadMetadata.model_validate_json(data)

    async def save_thread(self, thread: ThreadMetadata, context: Any) -> None:
        if (reads := _reads(context)) is not None:
            reads.forget_thread(thread.id)
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
            context,
        )

    async def delete_thread(self, thread_id: str, context: Any) -> None:
        """Items, feedback, attachments and their bytes go with the thread (ON DELETE CASCADE).

        Idempotent, like the SDK's reference store: a missing (or another user's) thread is a
        no-op. The HTTP layer checks existence first, so clients still get a 404."""
        if (reads := _reads(context)) is not None:
            reads.forget_thread(thread_id)
        await self._execute(SQL_DELETE_THREAD, user_id_of(context), thread_id)

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
        reads = _reads(context) if after is None else None
        key = (thread_id, _order(order))
        if reads is not None and key in reads.items:
            known, more = reads.items[key]
            if limit <= len(known) or not more:
                n = _limit(limit)
                has_more = more or len(known) > n
                data = [item.model_copy(deep=True) for item in known[:n]]
                return Page(data=data, has_more=has_more, after=data[-1].id if has_more else None)
        page: Page[ThreadItem] = await self._page(
            _ITEM_PAGES[key[1]],
            (user_id, thread_id),
            after,
            limit,
            _ITEM.validate_json,
            context,
        )
        if self.attachment_hook is not None:
            page.data = [self._fresh(item, user_id) for item in page.data]
        if reads is not None:
            reads.items[key] = ([item.model_copy(deep=True) for item in page.data], page.has_more)
        return page

    def _wrote_items(self, thread_id: str, context: Any) -> None:
        if (reads := _reads(context)) is not None:
            reads.forget_items(thread_id)

    async def add_thread_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        """Add a new item; the same item again (a retry) is harmless. A *different* item under
        an id the thread holds raises ``ItemConflictError`` and changes nothing (the SDK's
        reference store refuses it too): a responder yielding an id again must not undo what
        the user did to the item, e.g. store an answered structured input back as pending.
        ``save_item`` replaces. Only a workflow replaces itself here: the SDK resumes the
        thread's last workflow and adds it again with its new tasks."""
        self._wrote_items(thread_id, context)
        written = await self._execute(
            SQL_ADD_ITEM,
            user_id_of(context),
            thread_id,
            item.id,
            _ts(item.created_at),
            item.type,
            _dump(item),
            fetch="fetchval",
        )
        if written is None:
            raise ItemConflictError()

    async def save_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        self._wrote_items(thread_id, context)
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
        self._wrote_items(thread_id, context)
        await self._execute(SQL_DELETE_ITEM, user_id_of(context), thread_id, item_id)

    # --- attachments --------------------------------------------------------------------

    async def save_attachment(self, attachment: Attachment, context: Any) -> None:
        """Insert or update. An attachment belongs to the thread that first sends it, and is
        deleted with that thread (ON DELETE CASCADE): saving it for another thread, or without
        its thread, raises ``AttachmentInUseError`` and changes nothing, so one thread's
        deletion can never take a file that another thread's message shows."""
        written = await self._execute(
            SQL_SAVE_ATTACHMENT,
            user_id_of(context),
            attachment.id,
            attachment.thread_id,
            _dump(attachment),
            fetch="fetchval",
        )
        if written is None:
            raise AttachmentInUseError()

    async def load_attachment(self, attachment_id: str, context: Any) -> Attachment:
        user_id = user_id_of(context)
        data = await self._fetchval(SQL_LOAD_ATTACHMENT, user_id, attachment_id)
        if data is None:
            raise NotFoundError(f"Attachment {attachment_id} not found")
        attachment = _ATTACHMENT.validate_json(data)
        hook = self.attachment_hook
        return attachment if hook is None else hook(attachment, user_id)

    async def delete_attachment(self, attachment_id: str, context: Any) -> None:
        """Delete the attachment and its bytes, unless a user message of its thread shows it
        (``AttachmentInUseError``, 409: it goes with its thread). The ChatKit client deletes
        the files a user takes out of the composer, before sending them.

        Idempotent: the SDK's ``attachments.delete`` calls the attachment store's delete and
        then this one for the same id, so the row may already be gone."""
        user_id = user_id_of(context)
        async with self.connection() as conn:
            deleted = await self.modify(
                conn, SQL_DELETE_ATTACHMENT, user_id, attachment_id, fetch="fetchval"
            )
            if deleted is None and (
                await conn.fetchval(SQL_LOAD_ATTACHMENT, user_id, attachment_id) is not None
            ):
                raise AttachmentInUseError(
                    "This file is part of a sent message: it is deleted with its conversation."
                )

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
        user_id = user_id_of(context)
        async with self.connection() as conn:
            try:
                if await self.on_citus(conn):
                    rows = [(user_id, thread_id, item_id, kind) for item_id in ids]
                    await write_as(conn, user_id, CITUS_SAVE_FEEDBACK_ROW, rows=rows)
                else:
                    await conn.execute(SQL_SAVE_FEEDBACK, user_id, thread_id, ids, kind)
            except asyncpg.ForeignKeyViolationError as exc:
                raise NotFoundError("parent not found") from exc

    async def load_feedback(self, thread_id: str, context: Any) -> dict[str, str]:
        async with self.connection() as conn:
            rows = await conn.fetch(SQL_LOAD_FEEDBACK, user_id_of(context), thread_id)
        return {r["item_id"]: r["kind"] for r in rows}
