"""Store benchmark: every ``PostgresStore`` method with row-level security against the store as
it was before it, and against the same SQL on raw asyncpg.

Five sides run on one fresh, migrated database in the same process and event loop:

* ``rls``: ``PostgresStore`` over the app's own pool (``app.pg.pool.open_pool`` and the app's
  settings: pool size, GUCs, timeouts) connecting as a role without BYPASSRLS, as production
  does (docs/rls.md): every statement sets ``app.user_id`` and PostgreSQL applies the policies
  of migration 0003. The role is created for the run and dropped at its end;
* ``pre``: the same store code, pool and settings, connecting as the tables' owner (whom the
  policies do not restrict) and running the statements the store had before row-level security
  (bench.pre_rls_sql): the baseline of "what the second wall costs", rls/pre;
* ``store``: today's store as the owner: the same statements as ``rls`` with the policies
  bypassed, so rls/store is what evaluating the policies costs and store/pre what the statements'
  new shape (set_config in the same round trip) costs;
* ``raw``: ``asyncpg.create_pool`` of the same size with the same per-session GUCs, issuing the
  store's own SQL constants and doing the same (de)serialisation of the pydantic models, so the
  difference is exactly what the store adds (its pool wrapper, error mapping, context
  handling, ...). Its ``reset`` is a no-op, as the app's pool's is (app.pg.pool);
* ``conn``: one bare ``asyncpg.connect`` connection, the floor (no pool at all), for reference.

``raw`` and ``conn`` run today's statements as the owner.

Each round runs every method on every side, in an order that rotates from round to round
(A/B/C/D/E, B/C/D/E/A, ...), so drift on this shared, noisy machine hits all sides alike. A
side's figure for a round is the mean over ``CALLS`` back-to-back calls; we quote the median
over rounds and ratios of those medians (rls/pre against the 10% target, store/raw against its
own); the medians of the per-round paired ratios are kept in the JSON too. Rows that a call
consumes (deletes) or creates (inserts) are prepared before each batch, outside the timed
region.

Where the processes run matters more than anything else here: on this VM a round trip between
two vCPUs costs ~65 µs more than one on a single core, and an unpinned backend lands on either,
so each *connection* is fast or slow at random. When PostgreSQL is local, the client thread and
every backend of the benchmark database are therefore pinned to one CPU (``BENCH_PLACEMENTS``
selects other placements, see ``PLACEMENTS``). Each figure is then CPU work plus the server's
own waits (WAL flush on commit), the same for every side.

The second part measures page latency at depth 0 and at depth 100,000 of a 200,000-item thread
(both orders) through ``store.load_thread_items``, with row-level security (``rls``) and before
it (``pre``), and prints the EXPLAIN (ANALYZE) of the deep page query as the app's role, which
must be an index range scan, custom or generic plan. Both parts report, from
``pg_prepared_statements``, any store statement PostgreSQL keeps re-planning on every call.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    nullcontext,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from chatkit.store import NotFoundError
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageItem,
    Attachment,
    FeedbackKind,
    Page,
    Thread,
    ThreadItem,
    ThreadMetadata,
)
from pydantic import BaseModel, TypeAdapter
from sqlalchemy.engine import make_url

from app.ids import new_id
from app.pg.engine import server_settings
from app.pg.pool import open_pool
from app.pg.store import (
    _ITEM_PAGES,
    _THREAD_PAGES,
    MAX_PAGE_SIZE,
    SQL_ADD_ITEM,
    SQL_DELETE_ATTACHMENT,
    SQL_DELETE_ITEM,
    SQL_DELETE_THREAD,
    SQL_LOAD_ATTACHMENT,
    SQL_LOAD_ITEM,
    SQL_LOAD_THREAD,
    SQL_SAVE_ATTACHMENT,
    SQL_SAVE_FEEDBACK,
    SQL_SAVE_THREAD,
    SQL_UPSERT_ITEM,
    PostgresStore,
    _PageSQL,
)
from app.settings import Settings
from bench import RESULTS_DIR
from bench.pre_rls_sql import pre_rls_sql
from tests.harness import factories as f
from tests.harness.pg import PgServer, describe, migrate, postgres_server

WARMUP_ROUNDS = 2
ROUNDS = 21
CALLS = 100  # calls per side per method per round
PAGE = 20  # chatkit.server.DEFAULT_PAGE_SIZE
TARGET = 1.3  # store / raw asyncpg (issue 14)
RLS_TARGET = 1.10  # rls / pre: what row-level security costs a store call
DEEP_TARGET = 1.2  # deep page / first page
DEEP_ITEMS = 200_000
DEEP_DEPTH = 100_000
PAGE_ROUNDS = 15
PAGE_CALLS = 50

USER = "bench_user"
SIDES = ("rls", "pre", "store", "raw", "conn")
PAGE_SIDES = ("rls", "pre")
TABLES = (
    "chatkit_threads",
    "chatkit_items",
    "chatkit_attachments",
    "chatkit_attachment_blobs",
    "chatkit_feedback",
)

_ITEM = TypeAdapter[ThreadItem](ThreadItem)
_ATTACHMENT = TypeAdapter[Attachment](Attachment)


@dataclass(frozen=True)
class Ctx:
    """The request context the server hands the store."""

    user_id: str


CTX = Ctx(USER)


# --- the raw side: the store's work written out by hand on plain asyncpg ---------------------


def _ts(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _dump(model: BaseModel, *, exclude: set[str] | None = None) -> str:
    return model.model_dump_json(by_alias=True, exclude=exclude)


class _Held:
    """``async with`` over one already-open connection (the ``conn`` side)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def __aenter__(self) -> asyncpg.Connection:
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        return None


class Raw:
    """Same signatures as the store, with the user id in place of the context.

    Same SQL (the store's module constants), same parameters, same JSON (de)serialisation and
    the same ``Page`` construction: only the store's own plumbing is left out.
    """

    def __init__(self, acquire: Callable[[], AbstractAsyncContextManager[asyncpg.Connection]]):
        self.acquire = acquire

    async def _page(
        self, sqls: _PageSQL, scope: Sequence[str], after: str | None, limit: int, decode: Any
    ) -> Page[Any]:
        n = min(limit, MAX_PAGE_SIZE)
        async with self.acquire() as conn:
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

    async def load_thread(self, thread_id: str, user: str) -> ThreadMetadata:
        async with self.acquire() as conn:
            data = await conn.fetchval(SQL_LOAD_THREAD, user, thread_id)
        if data is None:
            raise NotFoundError(thread_id)
        return ThreadMetadata.model_validate_json(data)

    async def save_thread(self, thread: ThreadMetadata, user: str) -> None:
        exclude = {"items"} if isinstance(thread, Thread) else None
        async with self.acquire() as conn:
            await conn.execute(
                SQL_SAVE_THREAD,
                user,
                thread.id,
                _ts(thread.created_at),
                thread.title,
                _dump(thread, exclude=exclude),
            )

    async def load_threads(
        self, limit: int, after: str | None, order: str, user: str
    ) -> Page[ThreadMetadata]:
        return await self._page(
            _THREAD_PAGES[order],  # type: ignore[index]
            (user,),
            after,
            limit,
            ThreadMetadata.model_validate_json,
        )

    async def delete_thread(self, thread_id: str, user: str) -> None:
        async with self.acquire() as conn:
            status = await conn.execute(SQL_DELETE_THREAD, user, thread_id)
        if status == "DELETE 0":
            raise NotFoundError(thread_id)

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, user: str
    ) -> Page[ThreadItem]:
        return await self._page(
            _ITEM_PAGES[order],  # type: ignore[index]
            (user, thread_id),
            after,
            limit,
            _ITEM.validate_json,
        )

    async def save_item(self, thread_id: str, item: ThreadItem, user: str) -> None:
        async with self.acquire() as conn:
            await conn.execute(
                SQL_UPSERT_ITEM,
                user,
                thread_id,
                item.id,
                _ts(item.created_at),
                item.type,
                _dump(item),
            )

    async def add_thread_item(self, thread_id: str, item: ThreadItem, user: str) -> None:
        async with self.acquire() as conn:
            await conn.fetchval(
                SQL_ADD_ITEM,
                user,
                thread_id,
                item.id,
                _ts(item.created_at),
                item.type,
                _dump(item),
            )

    async def load_item(self, thread_id: str, item_id: str, user: str) -> ThreadItem:
        async with self.acquire() as conn:
            data = await conn.fetchval(SQL_LOAD_ITEM, user, thread_id, item_id)
        if data is None:
            raise NotFoundError(item_id)
        return _ITEM.validate_json(data)

    async def delete_thread_item(self, thread_id: str, item_id: str, user: str) -> None:
        async with self.acquire() as conn:
            await conn.execute(SQL_DELETE_ITEM, user, thread_id, item_id)

    async def save_attachment(self, attachment: Attachment, user: str) -> None:
        async with self.acquire() as conn:
            await conn.execute(
                SQL_SAVE_ATTACHMENT, user, attachment.id, attachment.thread_id, _dump(attachment)
            )

    async def load_attachment(self, attachment_id: str, user: str) -> Attachment:
        async with self.acquire() as conn:
            data = await conn.fetchval(SQL_LOAD_ATTACHMENT, user, attachment_id)
        if data is None:
            raise NotFoundError(attachment_id)
        return _ATTACHMENT.validate_json(data)

    async def delete_attachment(self, attachment_id: str, user: str) -> None:
        async with self.acquire() as conn:
            status = await conn.execute(SQL_DELETE_ATTACHMENT, user, attachment_id)
        if status == "DELETE 0":
            raise NotFoundError(attachment_id)

    async def save_feedback(
        self, thread_id: str, item_ids: Sequence[str], kind: FeedbackKind, user: str
    ) -> None:
        if kind not in ("positive", "negative"):
            raise ValueError(kind)
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return
        async with self.acquire() as conn:
            await conn.execute(SQL_SAVE_FEEDBACK, user, thread_id, ids, kind)


# --- fixtures ------------------------------------------------------------------------------


def _assistant(thread_id: str, created_at: datetime, text: str) -> AssistantMessageItem:
    return AssistantMessageItem(
        id=new_id("message"),
        thread_id=thread_id,
        created_at=created_at,
        content=[AssistantMessageContent(text=text)],
    )


@dataclass
class Fixture:
    """Rows every case reads or rewrites; consumable rows are made per batch."""

    setup: asyncpg.Connection
    main: str = ""  # 220 items of every type, attachments and feedback targets
    upd: str = ""  # 50 items rewritten by save_item
    add: str = ""  # add_thread_item appends here
    dele: str = ""  # delete_thread_item consumes rows here
    main_items: list[ThreadItem] = field(default_factory=list)
    rich_items: list[ThreadItem] = field(default_factory=list)
    cursor_id: str = ""
    threads: list[ThreadMetadata] = field(default_factory=list)
    upd_items: list[ThreadItem] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    seq: int = 0

    async def insert_threads(self, threads: Sequence[ThreadMetadata]) -> None:
        await self.setup.executemany(
            SQL_SAVE_THREAD,
            [(USER, t.id, _ts(t.created_at), t.title, _dump(t)) for t in threads],
        )

    async def insert_items(self, thread_id: str, items: Sequence[ThreadItem]) -> None:
        await self.setup.executemany(
            SQL_UPSERT_ITEM,
            [(USER, thread_id, i.id, _ts(i.created_at), i.type, _dump(i)) for i in items],
        )

    async def insert_attachments(self, attachments: Sequence[Attachment]) -> None:
        await self.setup.executemany(
            SQL_SAVE_ATTACHMENT,
            [(USER, a.id, a.thread_id, _dump(a)) for a in attachments],
        )

    async def build(self) -> None:
        base = datetime(2026, 1, 1, 12, 0, 0)
        threads = [
            f.thread(created_at=base + timedelta(seconds=i), title=f"t{i}") for i in range(60)
        ]
        await self.insert_threads(threads)
        self.main, self.upd, self.add, self.dele = (t.id for t in threads[:4])
        self.threads = [t.model_copy(update={"title": f"renamed {t.title}"}) for t in threads[10:]]
        # main: 20 sets of every item type (220 rows), ~realistic mix for pages and loads.
        for k in range(20):
            self.main_items += f.all_item_types(self.main, base + timedelta(minutes=k))
        await self.insert_items(self.main, self.main_items)
        self.rich_items = self.main_items[:11]
        # The cursor of the "after" page: the 100th item in desc order.
        ordered = sorted(self.main_items, key=lambda i: i.created_at, reverse=True)
        self.cursor_id = ordered[99].id
        upd = [_assistant(self.upd, base + timedelta(seconds=i), f"v1 {i}") for i in range(50)]
        await self.insert_items(self.upd, upd)
        self.upd_items = [
            i.model_copy(update={"content": [AssistantMessageContent(text=f"v2 {n}")]})
            for n, i in enumerate(upd)
        ]
        self.attachments = [f.file_attachment(self.main), f.image_attachment(self.main)]
        await self.insert_attachments(self.attachments)
        await self.setup.execute("ANALYZE")  # plan on statistics, as autovacuum would

    # Consumables, one batch at a time (untimed).

    async def new_items(self, n: int) -> list[tuple[Any, ...]]:
        now = datetime.now()
        return [(self.add, f.user_message(self.add, "hi there", now)) for _ in range(n)]

    async def doomed_items(self, n: int) -> list[tuple[Any, ...]]:
        items = [f.user_message(self.dele, "bye", datetime.now()) for _ in range(n)]
        await self.insert_items(self.dele, items)
        return [(self.dele, i.id) for i in items]

    async def new_attachments(self, n: int) -> list[tuple[Any, ...]]:
        make = (f.file_attachment, f.image_attachment)
        return [(make[k % 2](self.main),) for k in range(n)]

    async def doomed_attachments(self, n: int) -> list[tuple[Any, ...]]:
        atts: list[Attachment] = [f.file_attachment(self.main) for _ in range(n)]
        await self.insert_attachments(atts)
        return [(a.id,) for a in atts]

    async def doomed_threads(self, n: int) -> list[tuple[Any, ...]]:
        """Threads holding two items each, so the delete cascades as it would in real use."""
        # Long ago: the churn stays at the far end of the index that load_threads reads first.
        self.seq += n
        old = datetime(2001, 1, 1)
        threads = [
            f.thread(created_at=old + timedelta(seconds=self.seq + k), title="doomed")
            for k in range(n)
        ]
        await self.insert_threads(threads)
        for t in threads:
            await self.insert_items(
                t.id, [f.user_message(t.id), _assistant(t.id, t.created_at, "a")]
            )
        return [(t.id,) for t in threads]


def _cycle(values: Sequence[tuple[Any, ...]]) -> Callable[[int], Awaitable[list[tuple[Any, ...]]]]:
    async def make(n: int) -> list[tuple[Any, ...]]:
        return [values[k % len(values)] for k in range(n)]

    return make


@dataclass
class Case:
    name: str
    method: str  # same name on PostgresStore and Raw
    args: Callable[[int], Awaitable[list[tuple[Any, ...]]]]
    fresh: bool = False  # args are consumed: make new ones for every batch


def _cases(fx: Fixture) -> list[Case]:
    main = fx.main
    ids = [i.id for i in fx.main_items]
    return [
        Case("load_thread", "load_thread", _cycle([(main,)])),
        Case("save_thread", "save_thread", _cycle([(t,) for t in fx.threads])),
        Case("load_threads (first page)", "load_threads", _cycle([(PAGE, None, "desc")])),
        Case("add_thread_item", "add_thread_item", fx.new_items, fresh=True),
        Case("save_item", "save_item", _cycle([(fx.upd, i) for i in fx.upd_items])),
        Case("load_item", "load_item", _cycle([(main, i.id) for i in fx.rich_items])),
        Case(
            "load_thread_items (first page)",
            "load_thread_items",
            _cycle([(main, None, PAGE, "desc")]),
        ),
        Case(
            "load_thread_items (after cursor)",
            "load_thread_items",
            _cycle([(main, fx.cursor_id, PAGE, "desc")]),
        ),
        Case("delete_thread_item", "delete_thread_item", fx.doomed_items, fresh=True),
        Case("save_attachment", "save_attachment", fx.new_attachments, fresh=True),
        Case("load_attachment", "load_attachment", _cycle([(a.id,) for a in fx.attachments])),
        Case("delete_attachment", "delete_attachment", fx.doomed_attachments, fresh=True),
        Case("delete_thread", "delete_thread", fx.doomed_threads, fresh=True),
        Case(
            "save_feedback",
            "save_feedback",
            _cycle(
                [
                    (main, ids[k : k + 2], "positive" if k % 4 else "negative")
                    for k in range(0, 40, 2)
                ]
            ),
        ),
    ]


# --- where the processes run ----------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """CPUs for the client (this thread) and for the benchmark's PostgreSQL backends.

    On this VM a round trip between two vCPUs costs ~65 µs more than one that stays on a core
    (waking an idle vCPU), and the scheduler puts each backend on either, so unpinned figures
    flip between two modes per *connection*: store and raw would each draw a placement at
    random. Pinning every side alike removes that from the comparison.
    """

    name: str
    client: frozenset[int] | None
    server: frozenset[int] | None
    about: str


UNPINNED = Placement("unpinned", None, None, "nothing pinned: expect bimodal, unstable figures")
# BENCH_PLACEMENTS=1core,2cores,unpinned picks which to run (in that order); 1core by default,
# the only one that is stable here. 2cores behaves like a remote server on an idle machine,
# but on this VM its figures depend on how long the other vCPU sat idle, not only on the code.
PLACEMENTS = [p for p in os.environ.get("BENCH_PLACEMENTS", "1core").split(",") if p]


class Pinner:
    """Pins the client and every backend of the benchmark database (new ones included)."""

    def __init__(self, setup: asyncpg.Connection, database: str) -> None:
        self.setup = setup
        self.database = database
        self.original = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def _ours(self, pid: int) -> bool:
        """A local PostgreSQL backend of our database, not a namesake pid in a container."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                title = fh.read().decode(errors="replace")
        except OSError:
            return False
        return title.startswith("postgres") and f" {self.database} " in title

    async def _backends(self) -> list[int]:
        rows = await self.setup.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend'"
        )
        return [r[0] for r in rows]

    async def placements(self, wanted: Sequence[str]) -> list[Placement]:
        """The placements asked for that this machine allows; unpinned when none is."""
        out: list[Placement] = []
        can_pin = (
            self.original is not None
            and hasattr(os, "sched_setaffinity")
            # a local backend of ours: not a remote server, nor one in a container
            and self._ours(self.setup.get_server_pid())
        )
        cpus = sorted(self.original or ())
        for name in wanted:
            if name == "1core" and can_pin:
                one = frozenset(cpus[:1])
                about = f"client and its PostgreSQL backends pinned to CPU {cpus[0]}"
                out.append(Placement("1 core", one, one, about))
            elif name == "2cores" and can_pin and len(cpus) > 1:
                about = f"client pinned to CPU {cpus[0]}, PostgreSQL backends to CPU {cpus[1]}"
                out.append(Placement("2 cores", frozenset(cpus[:1]), frozenset(cpus[1:2]), about))
            elif name == "unpinned":
                out.append(UNPINNED)
        try:
            for placement in out:
                await self.apply(placement)
        except OSError:
            out = []
        return out or [UNPINNED]

    async def apply(self, placement: Placement) -> None:
        if placement.client is None or placement.server is None:
            return
        os.sched_setaffinity(0, placement.client)
        for pid in await self._backends():
            if self._ours(pid):
                os.sched_setaffinity(pid, placement.server)

    async def restore(self) -> None:
        """Everything back on every CPU (the bulk load has no business on one core)."""
        if self.original is None or not hasattr(os, "sched_setaffinity"):
            return
        os.sched_setaffinity(0, self.original)
        for pid in await self._backends():
            if self._ours(pid):
                os.sched_setaffinity(pid, self.original)


# --- timing ---------------------------------------------------------------------------------


async def _batch(
    fn: Callable[..., Awaitable[Any]], args: list[tuple[Any, ...]], last: Any
) -> float:
    """Mean µs per call over back-to-back calls."""
    t0 = time.perf_counter_ns()
    for a in args:
        await fn(*a, last)
    return (time.perf_counter_ns() - t0) / len(args) / 1_000


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Sides:
    """What the benchmark measures: the stores, the raw asyncpg sides and an owner connection."""

    rls: PostgresStore  # the app's role: policies applied
    owner: PostgresStore  # the tables' owner: policies bypassed (``pre`` and ``store``)
    raws: dict[str, Raw]
    setup: asyncpg.Connection  # the owner, for fixtures
    rls_dsn: str

    def targets(self) -> dict[str, tuple[Any, Any, Callable[[], AbstractContextManager[Any]]]]:
        """side -> (object with the store's methods, its last argument, context of a batch)."""
        return {
            "rls": (self.rls, CTX, nullcontext),
            "pre": (self.owner, CTX, pre_rls_sql),
            "store": (self.owner, CTX, nullcontext),
            "raw": (self.raws["raw"], USER, nullcontext),
            "conn": (self.raws["conn"], USER, nullcontext),
        }


def _ratio(s: dict[str, list[float]], a: str, b: str) -> tuple[float, float]:
    """a/b of the medians, and the median of the per-round paired ratios."""
    return (
        round(_median(s[a]) / _median(s[b]), 3),
        round(_median([x / y for x, y in zip(s[a], s[b], strict=True)]), 3),
    )


async def _method_bench(
    sides: Sides, fx: Fixture, pin: Pinner, placement: Placement
) -> dict[str, Any]:
    cases = _cases(fx)
    samples: dict[str, dict[str, list[float]]] = {c.name: {s: [] for s in SIDES} for c in cases}
    targets = sides.targets()
    for rnd in range(WARMUP_ROUNDS + ROUNDS):
        await pin.apply(placement)  # pools may have opened connections since
        k = rnd % len(SIDES)
        order = SIDES[k:] + SIDES[:k]
        for case in cases:
            shared = None if case.fresh else await case.args(CALLS)
            for side in order:
                args = shared if shared is not None else await case.args(CALLS)
                obj, last, context = targets[side]
                with context():
                    us = await _batch(getattr(obj, case.method), args, last)
                if rnd >= WARMUP_ROUNDS:
                    samples[case.name][side].append(us)
    out: dict[str, Any] = {}
    for case in cases:
        s = samples[case.name]
        med = {side: _median(s[side]) for side in SIDES}
        rls_pre, rls_pre_paired = _ratio(s, "rls", "pre")
        rls_store, rls_store_paired = _ratio(s, "rls", "store")
        store_pre, store_pre_paired = _ratio(s, "store", "pre")
        out[case.name] = {
            "rls_us": round(med["rls"], 1),
            "pre_us": round(med["pre"], 1),
            "rls_over_pre": rls_pre,
            "rls_over_pre_paired": rls_pre_paired,
            "rls_extra_us": round(med["rls"] - med["pre"], 1),
            "rls_within_target": rls_pre <= RLS_TARGET,
            "rls_over_store": rls_store,
            "rls_over_store_paired": rls_store_paired,
            "store_over_pre": store_pre,
            "store_over_pre_paired": store_pre_paired,
            "store_us": round(med["store"], 1),
            "raw_us": round(med["raw"], 1),
            "conn_us": round(med["conn"], 1),
            "ratio": round(med["store"] / med["raw"], 3),
            "ratio_paired": round(
                _median([a / b for a, b in zip(s["store"], s["raw"], strict=True)]), 3
            ),
            "ratio_vs_conn": round(med["store"] / med["conn"], 3),
            "within_target": med["store"] / med["raw"] <= TARGET,
            "rounds": {side: [round(x, 1) for x in s[side]] for side in SIDES},
        }
    return out


def _statement_names() -> dict[str, str]:
    import app.pg.store as st

    names = {v: k for k, v in vars(st).items() if k.startswith("SQL_") and isinstance(v, str)}
    for table, pages in (("threads", _THREAD_PAGES), ("items", _ITEM_PAGES)):
        for order, sqls in pages.items():
            names[sqls.first] = f"{table} page {order} first"
            names[sqls.after] = f"{table} page {order} after"
            names[sqls.exists] = f"{table} page cursor exists"
    return names


async def _plan_cache(store: PostgresStore) -> dict[str, tuple[int, int]]:
    """(generic, custom) plan counts of the store's prepared statements on its pooled
    connection: a statement kept on custom plans is planned again on every call."""
    names = _statement_names()
    async with store.connection() as conn:
        rows = await conn.fetch(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
        )
    return {names[r[0]]: (r[1], r[2]) for r in rows if r[0] in names}


def _plan_delta(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> list[dict[str, Any]]:
    out = []
    for name, (generic, custom) in sorted(after.items()):
        g0, c0 = before.get(name, (0, 0))
        if generic - g0 or custom - c0:
            out.append(
                {"statement": name, "generic_plans": generic - g0, "custom_plans": custom - c0}
            )
    return out


# --- deep pages ----------------------------------------------------------------------------


async def _bulk_thread(conn: asyncpg.Connection) -> str:
    """A 200,000-item thread in one INSERT ... SELECT: 30% of the rows share a created_at
    with their neighbours (ties of three), the rest are distinct."""
    thread = f.thread(created_at=datetime(2025, 6, 1), title="deep")
    await conn.execute(
        SQL_SAVE_THREAD, USER, thread.id, _ts(thread.created_at), thread.title, _dump(thread)
    )
    template = f.user_message(thread.id, "x", datetime(2025, 6, 1)).model_dump(
        mode="json", by_alias=True, exclude={"id", "created_at", "content"}
    )
    await conn.execute(
        "INSERT INTO chatkit_items (user_id, thread_id, id, created_at, type, data) "
        "SELECT $1, $2, s.id, s.ts, 'user_message', $4::jsonb || jsonb_build_object("
        "'id', s.id, 'created_at', to_char(s.ts AT TIME ZONE 'UTC', "
        "'YYYY-MM-DD\"T\"HH24:MI:SS.US'), 'content', jsonb_build_array(jsonb_build_object("
        "'type', 'input_text', 'text', 'message number ' || s.g))) "
        "FROM (SELECT g, 'msg_deep' || lpad(g::text, 7, '0') AS id, "
        "$3::timestamptz + (CASE WHEN g % 10 < 3 THEN g - g % 10 ELSE g END) "
        "* interval '1 millisecond' AS ts FROM generate_series(1, $5::int) g) s ORDER BY s.g",
        USER,
        thread.id,
        datetime(2025, 6, 1, tzinfo=UTC),
        json.dumps(template),
        DEEP_ITEMS,
    )
    await conn.execute("VACUUM (ANALYZE) chatkit_items")
    return thread.id


async def _ids_at(conn: asyncpg.Connection, tid: str, order: str, offset: int, n: int) -> list[str]:
    d = "ASC" if order == "asc" else "DESC"
    rows = await conn.fetch(
        "SELECT id FROM chatkit_items WHERE user_id = $1 AND thread_id = $2 "
        f"ORDER BY created_at {d}, seq {d} OFFSET $3 LIMIT $4",
        USER,
        tid,
        offset,
        n,
    )
    return [r[0] for r in rows]


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = [node]
    for child in node.get("Plans", []):
        out += _walk(child)
    return out


def _plan_summary(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    # Scans of a table or an index (not the Result/Subquery nodes around set_config).
    scans = [
        n for n in nodes if "Scan" in n["Node Type"] and ("Relation Name" in n or "Index Name" in n)
    ]
    return {
        "scans": [
            f"{n['Node Type']} on {n.get('Index Name') or n.get('Relation Name')}"
            f" (rows {n['Actual Rows']})"
            for n in scans
        ],
        # Every scan is an index scan reading at most the page plus one row.
        "index_range_scan": bool(scans)
        and all(n["Node Type"].startswith("Index") for n in scans)
        and all(n["Actual Rows"] * n.get("Actual Loops", 1) <= PAGE + 1 for n in scans),
        "no_big_sort": all(n["Actual Rows"] <= PAGE + 1 for n in nodes if n["Node Type"] == "Sort"),
    }


async def _explain(
    conn: asyncpg.Connection, tid: str, cursors: dict[str, dict[str, str]]
) -> dict[str, Any]:
    """The deep page's plan as the store's query runs it on ``conn`` (the app's role, so under
    the policies), custom and generic (what a cached prepared statement may switch to): both
    must be index range scans."""
    out: dict[str, Any] = {}
    for order, by_kind in cursors.items():
        cursor = by_kind["deep"]
        sql = _ITEM_PAGES[order].after
        args = (USER, tid, cursor, PAGE + 1)
        text = [r[0] for r in await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)]
        plan = json.loads(await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args))
        await conn.execute(f"PREPARE deep_{order} (text, text, text, int) AS {sql}")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        # EXECUTE takes no bind parameters: let the server quote the values.
        execute = await conn.fetchval(
            f"SELECT format('EXECUTE deep_{order}(%L, %L, %L, %s)', $1::text, $2::text, "
            "$3::text, $4::int)",
            *args,
        )
        generic = json.loads(await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + execute))
        await conn.execute("RESET plan_cache_mode")
        await conn.execute(f"DEALLOCATE deep_{order}")
        out[order] = {
            "text": text,
            "custom": _plan_summary(_walk(plan[0]["Plan"])),
            "generic": _plan_summary(_walk(generic[0]["Plan"])),
            "rows": plan[0]["Plan"]["Actual Rows"],
            "planning_ms": plan[0]["Planning Time"],
            "execution_ms": plan[0]["Execution Time"],
        }
    return out


async def _page_setup(sides: Sides, conn: asyncpg.Connection) -> dict[str, Any]:
    t0 = time.perf_counter()
    tid = await _bulk_thread(conn)
    load_s = time.perf_counter() - t0
    cursors: dict[str, dict[str, str]] = {}
    for order in ("asc", "desc"):
        cursors[order] = {}
        for kind, depth in (("shallow", 1), ("deep", DEEP_DEPTH)):
            cursor = (await _ids_at(conn, tid, order, depth - 1, 1))[0]
            cursors[order][kind] = cursor
            # The store's page is exactly rows depth+1 .. depth+PAGE (ties included), with
            # row-level security and before it.
            expected = await _ids_at(conn, tid, order, depth, PAGE)
            for side in PAGE_SIDES:
                store, last, context = sides.targets()[side]
                with context():
                    page = await store.load_thread_items(tid, cursor, PAGE, order, last)
                assert [i.id for i in page.data] == expected, f"{kind} {order} page is wrong"
                assert page.has_more
    return {"thread": tid, "cursors": cursors, "bulk_load_s": round(load_s, 1)}


PAGE_KINDS = ("first", "shallow", "deep")  # no cursor; cursor at item 1; at item DEEP_DEPTH


async def _page_bench(
    sides: Sides, deep: dict[str, Any], pin: Pinner, placement: Placement
) -> dict[str, Any]:
    tid, cursors = deep["thread"], deep["cursors"]
    targets = sides.targets()
    variants = [
        (side, order, kind, None if kind == "first" else cursors[order][kind])
        for order in ("asc", "desc")
        for kind in PAGE_KINDS
        for side in PAGE_SIDES
    ]
    samples: dict[tuple[str, str, str], list[float]] = {(s, o, k): [] for s, o, k, _ in variants}
    for rnd in range(WARMUP_ROUNDS + PAGE_ROUNDS):
        await pin.apply(placement)
        k = rnd % len(variants)
        for side, order, kind, cursor in variants[k:] + variants[:k]:
            store, last, context = targets[side]
            with context():
                us = await _batch(
                    store.load_thread_items, [(tid, cursor, PAGE, order)] * PAGE_CALLS, last
                )
            if rnd >= WARMUP_ROUNDS:
                samples[(side, order, kind)].append(us)
    out: dict[str, Any] = {}
    for order in ("asc", "desc"):
        o: dict[str, Any] = {}
        for side in PAGE_SIDES:
            med = {kind: _median(samples[(side, order, kind)]) for kind in PAGE_KINDS}
            o[side] = {
                "first_us": round(med["first"], 1),
                "shallow_us": round(med["shallow"], 1),
                "deep_us": round(med["deep"], 1),
                "ratio": round(med["deep"] / med["first"], 3),
                "ratio_vs_shallow": round(med["deep"] / med["shallow"], 3),
                "within_target": med["deep"] / med["first"] <= DEEP_TARGET,
                "rounds": {
                    kind: [round(x, 1) for x in samples[(side, order, kind)]] for kind in PAGE_KINDS
                },
            }
        o["rls_over_pre"] = {
            kind: round(
                _median(samples[("rls", order, kind)]) / _median(samples[("pre", order, kind)]),
                3,
            )
            for kind in PAGE_KINDS
        }
        # The production side's figures at the top level, as before.
        o.update({k: v for k, v in o["rls"].items()})
        out[order] = o
    return out


# --- orchestration --------------------------------------------------------------------------


@asynccontextmanager
async def _app_role(setup: asyncpg.Connection, url: str) -> AsyncIterator[str]:
    """A LOGIN role without BYPASSRLS holding the app's grants (docs/rls.md); yields its URL.
    Role names are cluster-wide: it is dropped however the run ends."""
    role = f"ckpg_bench_app_{secrets.token_hex(6)}"
    password = secrets.token_urlsafe(18)
    await setup.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' NOSUPERUSER NOBYPASSRLS")
    try:
        await setup.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        await setup.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(TABLES)} TO {role}"
        )
        yield (
            make_url(url)
            .set(username=role, password=password)
            .render_as_string(hide_password=False)
        )
    finally:
        await setup.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await setup.execute(f"DROP OWNED BY {role}")
        await setup.execute(f"DROP ROLE {role}")


@asynccontextmanager
async def _sides(url: str, settings: Settings) -> AsyncIterator[Sides]:
    dsn = PgServer.dsn(url)
    # The raw sides run with the plan-cache mode the app's pool sets on one node (app.pg.pool).
    gucs = server_settings(settings) | {"plan_cache_mode": "force_generic_plan"}
    setup = await asyncpg.connect(dsn)

    async def no_reset(conn: asyncpg.Connection) -> None:
        return None

    try:
        async with _app_role(setup, url) as rls_url:
            engine = await open_pool(url, settings)
            rls_engine = await open_pool(rls_url, settings)
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=settings.db_pool_size + settings.db_max_overflow,
                server_settings=gucs,
                reset=no_reset,
            )
            bare = await asyncpg.connect(dsn, server_settings=gucs)
            try:
                rls = PostgresStore(rls_engine)
                if not await rls.row_security_enforced():
                    raise RuntimeError("the benchmark's app role bypasses row-level security")
                yield Sides(
                    rls=rls,
                    owner=PostgresStore(engine),
                    raws={"raw": Raw(pool.acquire), "conn": Raw(lambda: _Held(bare))},
                    setup=setup,
                    rls_dsn=PgServer.dsn(rls_url),
                )
            finally:
                await bare.close()
                await pool.close()
                await rls_engine.close()
                await engine.close()
    finally:
        await setup.close()


async def _bench(url: str, server: PgServer) -> dict[str, Any]:
    settings = Settings(database_url=url)
    async with _sides(url, settings) as sides:
        setup = sides.setup
        fx = Fixture(setup)
        await fx.build()
        pin = Pinner(setup, await setup.fetchval("SELECT current_database()"))
        try:
            placements = await pin.placements(PLACEMENTS)
            methods: dict[str, Any] = {}
            timings: dict[str, float] = {}
            for placement in placements:
                started = time.perf_counter()
                methods[placement.name] = await _method_bench(sides, fx, pin, placement)
                timings[f"methods {placement.name}"] = time.perf_counter() - started
            plans_methods = await _plan_cache(sides.rls)
            started = time.perf_counter()
            await pin.restore()
            deep = await _page_setup(sides, setup)
            pages: dict[str, Any] = {"items": DEEP_ITEMS, "depth": DEEP_DEPTH, "page": PAGE}
            pages["bulk_load_s"] = deep["bulk_load_s"]
            pages["placements"] = {}
            for placement in placements:
                pages["placements"][placement.name] = await _page_bench(sides, deep, pin, placement)
            plans_pages = await _plan_cache(sides.rls)
            rls_conn = await asyncpg.connect(sides.rls_dsn)
            try:
                pages["explain"] = await _explain(rls_conn, deep["thread"], deep["cursors"])
            finally:
                await rls_conn.close()
            timings["pages"] = time.perf_counter() - started
        finally:
            await pin.restore()
        version = await setup.fetchval("SHOW server_version")
    return {
        "meta": {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "postgres": {**describe(server), "version": version},
            "python": platform.python_version(),
            "event_loop": type(asyncio.get_running_loop()).__module__,
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "placements": {p.name: p.about for p in placements},
            "sides": {
                "rls": "PostgresStore as a NOBYPASSRLS role: today's statements, policies applied",
                "pre": "PostgresStore as the owner, running the statements from before RLS",
                "store": "PostgresStore as the owner: today's statements, policies bypassed",
                "raw": "asyncpg pool as the owner, today's statements",
                "conn": "one asyncpg connection as the owner, today's statements",
            },
            "rounds": ROUNDS,
            "warmup_rounds": WARMUP_ROUNDS,
            "calls_per_round": CALLS,
            "page_rounds": PAGE_ROUNDS,
            "page_calls_per_round": PAGE_CALLS,
            "page_size": PAGE,
            "pool_size": settings.db_pool_size,
            "max_overflow": settings.db_max_overflow,
            "phase_s": {k: round(v, 1) for k, v in timings.items()},
            "targets": {
                "rls_over_pre": RLS_TARGET,
                "store_over_raw": TARGET,
                "deep_over_first": DEEP_TARGET,
            },
        },
        "rls": _rls_summary(methods, pages),
        "methods": methods,
        "plan_cache": {
            "methods": _plan_delta({}, plans_methods),
            "pages": _plan_delta(plans_methods, plans_pages),
        },
        "pages": pages,
    }


def _rls_summary(methods: dict[str, Any], pages: dict[str, Any]) -> dict[str, Any]:
    """Per placement: the cost of row-level security over every store method."""
    out: dict[str, Any] = {}
    for name, by_method in methods.items():
        ratios = {m: v["rls_over_pre"] for m, v in by_method.items()}
        extra = {m: v["rls_extra_us"] for m, v in by_method.items()}
        page = pages["placements"].get(name, {})
        out[name] = {
            "target": RLS_TARGET,
            "median_ratio": round(_median(list(ratios.values())), 3),
            "max_ratio": max(ratios.values()),
            "max_method": max(ratios, key=lambda m: ratios[m]),
            "median_extra_us": round(_median(list(extra.values())), 1),
            "methods_within_target": sum(r <= RLS_TARGET for r in ratios.values()),
            "methods": len(ratios),
            "all_within_target": all(r <= RLS_TARGET for r in ratios.values()),
            "pages_rls_over_pre": {o: page[o]["rls_over_pre"] for o in page},
        }
    return out


def _report(res: dict[str, Any]) -> None:
    meta = res["meta"]
    pg = meta["postgres"]
    print(
        f"\nStore benchmark: PostgreSQL {pg['version']} ({pg['kind']}), Python {meta['python']},"
        f" {meta['event_loop']} loop, {meta['cpus']} CPUs, load {meta['loadavg'][0]:.2f}"
    )
    print(
        f"µs per call = median over {meta['rounds']} interleaved rounds of {meta['calls_per_round']}"
        " calls."
    )
    for side, about in meta["sides"].items():
        print(f"  {side:<6} {about}")
    names = list(meta["placements"])
    for name in names:
        print(f"  [{name}] {meta['placements'][name]}")
    for name in names:
        print(f"\nRow-level security, per store call [{name}] (target rls/pre <= {RLS_TARGET}x)\n")
        print(
            f"{'method':<34}{'rls µs':>9}{'pre µs':>9}{'rls/pre':>9}{'+µs':>8}"
            f"{'store µs':>10}{'rls/store':>11}{'store/pre':>11}"
        )
        print("-" * 101)
        for method, m in res["methods"][name].items():
            flag = " " if m["rls_within_target"] else "!"
            print(
                f"{method:<34}{m['rls_us']:>9.1f}{m['pre_us']:>9.1f}{m['rls_over_pre']:>8.3f}x"
                f"{flag}{m['rls_extra_us']:>7.1f}{m['store_us']:>10.1f}"
                f"{m['rls_over_store']:>10.3f}x{m['store_over_pre']:>10.3f}x"
            )
        r = res["rls"][name]
        print(
            f"('!' = over the target) median rls/pre {r['median_ratio']}x, max"
            f" {r['max_ratio']}x ({r['max_method']}), median +{r['median_extra_us']} µs;"
            f" {r['methods_within_target']}/{r['methods']} methods within the target"
        )
    print("\nThe store against raw asyncpg (today's statements, as the owner)\n")
    cell = f"{'store µs':>9}{'raw µs':>8}{'store/raw':>11}{'conn µs':>9}"
    print(f"{'':<34}" + "".join(f"   {('[' + n + ']'):<{len(cell)}}" for n in names))
    print(f"{'method':<34}" + "".join(f"   {cell}" for _ in names))
    print("-" * (34 + (len(cell) + 3) * len(names)))
    first = res["methods"][names[0]]
    for method in first:
        line = f"{method:<34}"
        for name in names:
            m = res["methods"][name][method]
            flag = " " if m["within_target"] else "!"
            line += (
                f"   {m['store_us']:>9.1f}{m['raw_us']:>8.1f}{m['ratio']:>9.2f}x{flag}"
                f"{m['conn_us']:>9.1f}"
            )
        print(line)
    print(f"('!' = over the {TARGET}x target)")
    for phase, label in (("methods", "the method rounds"), ("pages", "the page rounds")):
        stuck = [
            p for p in res["plan_cache"][phase] if p["custom_plans"] > max(5, p["generic_plans"])
        ]
        if stuck:
            print(f"\nPlanned again on every call during {label} (pg_prepared_statements):")
            for p in stuck:
                print(
                    f"  {p['statement']:<30} {p['custom_plans']:>6} custom plans,"
                    f" {p['generic_plans']} generic"
                )
    p = res["pages"]
    print(
        f"\nPage latency: store.load_thread_items, {p['page']} items a page, in a thread of"
        f" {p['items']:,} items (bulk load {p['bulk_load_s']} s)\n"
    )
    deep_head = f"after {p['depth']:,} µs"
    print(
        f"{'placement':<12}{'side':<6}{'order':<7}{'first page µs':>15}{'after 1 µs':>12}"
        f"{deep_head:>18}{'deep/first':>12}{'deep/after 1':>14}"
    )
    for name in names:
        for order in ("asc", "desc"):
            for side in PAGE_SIDES:
                o = p["placements"][name][order][side]
                flag = "" if o["within_target"] else f"  over the {DEEP_TARGET}x target"
                print(
                    f"{name:<12}{side:<6}{order:<7}{o['first_us']:>15.1f}{o['shallow_us']:>12.1f}"
                    f"{o['deep_us']:>18.1f}{o['ratio']:>11.2f}x{o['ratio_vs_shallow']:>13.2f}x"
                    f"{flag}"
                )
            ratios = p["placements"][name][order]["rls_over_pre"]
            print(
                f"{'':<12}{'':<6}{order:<7}rls/pre: first {ratios['first']}x, after 1"
                f" {ratios['shallow']}x, deep {ratios['deep']}x"
            )
    print(
        "(first page: no cursor; after N: the page whose cursor is item N; deep/first is the"
        f" {DEEP_TARGET}x target, deep/after 1 the cost of depth alone)"
    )
    for order in ("asc", "desc"):
        e = p["explain"][order]
        print(
            f"\nEXPLAIN (ANALYZE, BUFFERS) of the page after item {p['depth']:,}, order {order},"
            " as the app's role (row-level security applied):"
        )
        for line in e["text"]:
            print("    " + line)
        for kind in ("custom", "generic"):
            s = e[kind]
            ok = s["index_range_scan"] and s["no_big_sort"]
            verdict = "index range scan" if ok else "NOT an index range scan"
            print(f"  {kind} plan: {verdict}: " + "; ".join(s["scans"]))
    phases = ", ".join(f"{k} {v} s" for k, v in meta["phase_s"].items())
    print(f"\n({phases})")


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed, as uvicorn uses it in production."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run() -> dict[str, Any]:
    """Pick PostgreSQL like the tests, benchmark on a fresh database, drop it, report."""
    started = time.perf_counter()
    with postgres_server() as server:
        url = asyncio.run(server.create_database("ckpg_bench"))
        try:
            migrate(url)
            with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
                res = runner.run(_bench(url, server))
        finally:
            asyncio.run(server.drop_database(url))
    res["meta"]["total_s"] = round(time.perf_counter() - started, 1)
    _report(res)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "store.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"store benchmark: {res['meta']['total_s']} s in all; figures in {path}")
    return res


if __name__ == "__main__":
    run()
    sys.exit(0)
