"""Full-text search over one user's threads: titles and the text of user and assistant messages.

The vectors are PostgreSQL's own (``tsvector`` columns kept by the triggers of migration 0005,
GIN-indexed); this module only reads them. A search is one statement (after the one building
its query), gated for row-level security like every store read (app.pg.sql) and filtered by
``user_id = $1`` itself, in each branch: threads whose title matches and items whose text
matches, ranked by ``ts_rank`` (titles are weighted A, messages D, so a title match ranks
first), ``ts_headline`` computed only for the page's rows. On Citus every table it reads is
filtered by the one user, so it routes to the user's shard.

The user's text never becomes query syntax: ``websearch_to_tsquery`` reads it (quotes, ``or``,
``-`` work as on a search engine; it never raises on any input), and the word being typed
(the last one, when the text does not end with a space) is matched as a prefix: its letters and
digits alone, quoted, go to ``to_tsquery`` with ``:*``. The configuration of every query is the
one of every vector, ``chatkit_search_config()`` (``SEARCH_TEXT_CONFIG``, a connection setting).

Ranked are the most recent ``CANDIDATES`` matching titles and messages (all of them for any
word that is not common): ranking every match of a common word costs a read of each. The
query (a ``tsquery``) is built by a first statement and passed to the search as a value.
Pages are keyset pages: the cursor is the last result's (rank, kind, seq), and the next page
starts strictly after it in the order (rank descending, titles before items, newest first).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.errors import ConfigurationError, InvalidInputError
from app.pg.calls import Call
from app.pg.engine import is_unavailable
from app.pg.pool import ConnectionPool
from app.pg.sql import gated_select

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 256
MAX_LIMIT = 500
MAX_CURSOR_CHARS = 128
_MAX_SEQ = 2**63 - 1
# Marks around the matched words in ts_headline's output; the indexed text has them removed
# (chatkit_search_text), so every mark is ts_headline's own.
START, STOP = "\x01", "\x02"
HEADLINE_OPTIONS = (
    f"StartSel={START}, StopSel={STOP}, MaxWords=24, MinWords=8, ShortWord=0, "
    'MaxFragments=2, FragmentDelimiter=" … "'
)
# The word being typed: a run of letters, digits and underscores at the very end.
_LAST_WORD = re.compile(r"(\w+)$")

_CFG = "chatkit_search_config()"
# The query is built by a statement of its own, first: $1 the text before the word being typed,
# $2 that word as a quoted prefix term, or NULL. Written into the search statement it was built
# again for every row tested and ranked (chatkit_search_config() is STABLE, so PostgreSQL cannot
# fold the expression into a constant): about 13 us a row, most of a common word's search. As a
# value ($2 of the search) it is built once, and the custom plan sees its words.
SQL_QUERY = (
    f"SELECT (websearch_to_tsquery({_CFG}, $1) "
    f"&& coalesce(to_tsquery({_CFG}, $2), ''::tsquery))::text"
)
_TQ = "$2::tsquery"
# Each branch ranks at most CANDIDATES matches, the most recent ones: a word in half of a
# user's 100,000 messages would otherwise mean reading and ranking 50,000 rows per keystroke.
# With custom plans (below) PostgreSQL reads a rare word's few rows from the GIN index (user_id
# and the vector, revision 0007, where btree_gin is available) and a common word's most recent
# rows backwards along a btree index, stopping at the CANDIDATES-th match: threads' (user_id,
# created_at, seq), and for messages (user_id, seq) of the indexed rows (seq follows insertion).
# 200, not 500: the walk reads CANDIDATES / (the share of the user's messages matching) rows, so
# two common words together (2% of the messages) meant 25,000 rows (bench/search_bench.py).
CANDIDATES = 200
_MATCHES = (
    "(SELECT 0 AS src, id AS thread_id, NULL::text AS item_id, seq, "
    f"ts_rank(search_vector, {_TQ}) AS rank FROM chatkit_threads "
    f"WHERE user_id = $1 AND search_vector @@ {_TQ} "
    f"ORDER BY created_at DESC, seq DESC LIMIT {CANDIDATES}) "
    f"UNION ALL (SELECT 1, thread_id, id, seq, ts_rank(search_vector, {_TQ}) FROM chatkit_items "
    f"WHERE user_id = $1 AND search_vector @@ {_TQ} ORDER BY seq DESC LIMIT {CANDIDATES})"
)
# $3: the limit; $4, $5, $6: the cursor's rank, kind and seq (all NULL for the first page).
_ORDER = "rank DESC, src, seq DESC"
_PAGE = (
    f"SELECT * FROM ({_MATCHES}) m WHERE $4::float4 IS NULL OR m.rank < $4::float4 "
    "OR (m.rank = $4::float4 AND (m.src > $5::int OR (m.src = $5::int AND m.seq < $6::bigint))) "
    f"ORDER BY m.{_ORDER.replace(', ', ', m.')} LIMIT $3"
)
# $7: ts_headline's options. The page's rows get their title and snippet.
_WITH_SNIPPETS = (
    "SELECT p.src, p.thread_id, p.item_id, p.seq, p.rank, t.title, "
    f"ts_headline({_CFG}, CASE p.src WHEN 0 THEN translate(t.title, E'\\x01\\x02', '') "
    f"ELSE chatkit_search_text(i.type, i.data) END, {_TQ}, $7) AS snippet "
    f"FROM ({_PAGE}) p JOIN chatkit_threads t ON t.user_id = $1 AND t.id = p.thread_id "
    "LEFT JOIN chatkit_items i ON i.user_id = $1 AND i.thread_id = p.thread_id "
    f"AND i.id = p.item_id ORDER BY p.{_ORDER.replace(', ', ', p.')}"
)
SQL_SEARCH = gated_select(
    "q.src, q.thread_id, q.item_id, q.seq, q.rank, q.title, q.snippet",
    _WITH_SNIPPETS,
    f"q.{_ORDER.replace(', ', ', q.')}",
)
SQL_CHECK_CONFIG = "SELECT $1::text::regconfig::text"
# The pool plans every statement generically (app.pg.pool); a search needs a plan for its
# words (how common they are decides between the two paths above), so its transaction asks
# for a custom plan. One round trip with BEGIN, one for the query, one for COMMIT.
SQL_BEGIN_CUSTOM = "BEGIN; SET LOCAL plan_cache_mode TO force_custom_plan"


@dataclass(frozen=True)
class Terms:
    """The user's text split for the statement: ``text`` for websearch_to_tsquery and the word
    being typed as a prefix term (``'word':*``), or None when the text ends with a space."""

    text: str
    prefix: str | None


def parse_query(q: str | None) -> Terms:
    """Check the user's text and split off the word being typed. Raises InvalidInputError
    (400) for a missing, blank, too long or unstorable text."""
    if q is None or not q.strip():
        raise InvalidInputError("Enter something to search for.", field="q")
    if len(q) > MAX_QUERY_CHARS:
        raise InvalidInputError(
            f"The search text may be at most {MAX_QUERY_CHARS} characters.", field="q"
        )
    if "\x00" in q or not _encodable(q):
        raise InvalidInputError("The search text contains characters it may not.", field="q")
    match = _LAST_WORD.search(q)
    if match is None:
        return Terms(q, None)
    # \w never matches a quote or a backslash: the quoted word is a single tsquery operand.
    return Terms(q[: match.start()], f"'{match.group(1)}':*")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # unpaired surrogates
        return False
    return True


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInputError(f"limit must be between 1 and {MAX_LIMIT}.", field="limit")
    return limit


@dataclass(frozen=True, order=True)
class Cursor:
    """Where a page ended: the last result's rank, kind (0 title, 1 item) and seq."""

    rank: float
    src: int
    seq: int

    def encode(self) -> str:
        raw = json.dumps([self.rank, self.src, self.seq], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """The cursor a previous page returned; anything else is a 400."""
        bad = InvalidInputError("after is not a cursor from a previous page.", field="after")
        if not token or len(token) > MAX_CURSOR_CHARS or not token.isascii():
            raise bad
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
            value = json.loads(raw)
        except (binascii.Error, ValueError):
            raise bad from None
        if not (isinstance(value, list) and len(value) == 3):
            raise bad
        rank, src, seq = value
        if not (isinstance(rank, float | int) and not isinstance(rank, bool)):
            raise bad
        if not math.isfinite(rank) or not 0 <= rank <= 1e30:
            raise bad
        if type(src) is not int or src not in (0, 1):
            raise bad
        if type(seq) is not int or not 0 <= seq <= _MAX_SEQ:
            raise bad
        return cls(float(rank), src, seq)


@dataclass(frozen=True)
class Segment:
    text: str
    hit: bool


@dataclass(frozen=True)
class Hit:
    """One match: a thread's title (``item_id`` None) or one of its messages."""

    thread_id: str
    item_id: str | None
    title: str | None
    rank: float
    snippet: list[Segment]

    def as_json(self) -> dict[str, Any]:
        return {
            "thread_id": self.thread_id,
            "item_id": self.item_id,
            "title": self.title,
            "rank": self.rank,
            "snippet": [{"text": s.text, "hit": s.hit} for s in self.snippet],
        }


@dataclass(frozen=True)
class SearchPage:
    hits: list[Hit]
    next_cursor: str | None

    def as_json(self) -> dict[str, Any]:
        return {"data": [h.as_json() for h in self.hits], "after": self.next_cursor}


def segments(headline: str) -> list[Segment]:
    """ts_headline's output as plain-text pieces, the matched ones marked: clients render text,
    never markup built from a user's words."""
    out: list[Segment] = []
    hit = False
    for part in re.split(f"([{START}{STOP}])", headline):
        if part == START:
            hit = True
        elif part == STOP:
            hit = False
        elif part:
            out.append(Segment(part, hit))
    return out


class ThreadSearch:
    """Searches through the app's pool, with the store's error mapping (503 when the database
    is away, 400 for text it cannot take)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    async def search(
        self, user_id: str, q: str | None, *, limit: int = 20, after: str | None = None
    ) -> SearchPage:
        terms = parse_query(q)
        limit = check_limit(limit)
        cursor = Cursor.decode(after) if after is not None else None
        args = (
            limit + 1,  # one more than asked: whether a next page exists
            cursor.rank if cursor else None,
            cursor.src if cursor else None,
            cursor.seq if cursor else None,
            HEADLINE_OPTIONS,
        )
        async with Call(self.pool) as conn:
            await conn.execute(SQL_BEGIN_CUSTOM)
            try:
                query = await conn.fetchval(SQL_QUERY, terms.text, terms.prefix)
                rows = await conn.fetch(SQL_SEARCH, user_id, query, *args)
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")
        more = len(rows) > limit
        rows = rows[:limit]
        hits = [
            Hit(r["thread_id"], r["item_id"], r["title"], r["rank"], segments(r["snippet"]))
            for r in rows
        ]
        last = rows[-1] if more else None
        next_cursor = Cursor(last["rank"], last["src"], last["seq"]).encode() if last else None
        return SearchPage(hits, next_cursor)


CHECK_TIMEOUT_SECONDS = 3.0


async def verify_search_config(pool: ConnectionPool, name: str) -> None:
    """At startup: ``check_search_config`` when the database answers; when it does not (yet),
    the app starts anyway, as it does without any database (app.pg.pool)."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS), pool.acquire() as conn:
            await check_search_config(conn, name)
    except ConfigurationError:
        raise
    except Exception as exc:
        if not (is_unavailable(exc) or isinstance(exc, TimeoutError)):
            raise
        log.warning("SEARCH_TEXT_CONFIG not checked: the database did not answer")


async def check_search_config(conn: asyncpg.Connection, name: str) -> None:
    """Fail at startup, naming the setting, when ``SEARCH_TEXT_CONFIG`` is not a text-search
    configuration of the database (the triggers would otherwise refuse every write)."""
    try:
        await conn.fetchval(SQL_CHECK_CONFIG, name)
    except asyncpg.UndefinedObjectError:
        raise ConfigurationError(
            f"SEARCH_TEXT_CONFIG={name!r} is not a text search configuration of the database "
            "(see \\dF in psql; 'simple' works for any language)"
        ) from None
