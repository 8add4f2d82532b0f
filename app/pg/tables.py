"""The PostgreSQL schema, as SQLModel tables.

Every table leads its keys with ``user_id`` so that one user's rows sit together in each index
and the tables can later be distributed by that column (Citus). The full ChatKit model is kept
as JSONB in ``data``; the other columns exist only for filtering, ordering and constraints.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    LargeBinary,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR
from sqlmodel import Field, SQLModel

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLModel.metadata.naming_convention = NAMING_CONVENTION
metadata = SQLModel.metadata


def _seq() -> Column[int]:
    """Monotonic tie-breaker for rows with equal ``created_at``."""
    return Column(BigInteger, Identity(always=False), nullable=False)


def _search_vector() -> Column[str]:
    """Kept by a trigger (migration 0005, app.pg.search); never written by the app."""
    return Column(TSVECTOR, nullable=True)


def _search_index() -> Index:
    """GIN on the user and the vector (``btree_gin``, migration 0007): one user's matching rows.
    Where the server has no ``btree_gin`` (the embedded development server), migration 0005's
    index on the vector alone stays instead."""
    return Index(
        None,
        "user_id",
        "search_vector",
        postgresql_using="gin",
        postgresql_where=text("search_vector IS NOT NULL"),
    )


def _ts(*, default_now: bool = False) -> Column[datetime]:
    return Column(
        DateTime(timezone=True),
        nullable=False,
        server_default=text("now()") if default_now else None,
    )


class ThreadRow(SQLModel, table=True):
    __tablename__ = "chatkit_threads"
    __table_args__ = (Index(None, "user_id", "created_at", "seq"), _search_index())

    user_id: str = Field(sa_column=Column(Text, primary_key=True))
    id: str = Field(sa_column=Column(Text, primary_key=True))
    seq: int = Field(sa_column=_seq())
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts(default_now=True))
    title: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    data: str = Field(sa_column=Column(JSONB, nullable=False))
    search_vector: str | None = Field(default=None, sa_column=_search_vector())


class ItemRow(SQLModel, table=True):
    __tablename__ = "chatkit_items"
    __table_args__ = (
        ForeignKeyConstraint(
            ["user_id", "thread_id"],
            ["chatkit_threads.user_id", "chatkit_threads.id"],
            ondelete="CASCADE",
        ),
        Index(None, "user_id", "thread_id", "created_at", "seq"),
        _search_index(),
        # A search's most recent matching messages (app.pg.search), newest first.
        Index(None, "user_id", "seq", postgresql_where=text("search_vector IS NOT NULL")),
    )

    user_id: str = Field(sa_column=Column(Text, primary_key=True))
    thread_id: str = Field(sa_column=Column(Text, primary_key=True))
    id: str = Field(sa_column=Column(Text, primary_key=True))
    seq: int = Field(sa_column=_seq())
    created_at: datetime = Field(sa_column=_ts())
    type: str = Field(sa_column=Column(Text, nullable=False))
    data: str = Field(sa_column=Column(JSONB, nullable=False))
    search_vector: str | None = Field(default=None, sa_column=_search_vector())


class AttachmentRow(SQLModel, table=True):
    __tablename__ = "chatkit_attachments"
    __table_args__ = (
        ForeignKeyConstraint(
            ["user_id", "thread_id"],
            ["chatkit_threads.user_id", "chatkit_threads.id"],
            ondelete="CASCADE",
        ),
        Index(None, "user_id", "thread_id"),
        CheckConstraint("status IN ('pending', 'uploading', 'ready')", name="status"),
        CheckConstraint("size_bytes >= 0", name="size_bytes"),
    )

    user_id: str = Field(sa_column=Column(Text, primary_key=True))
    id: str = Field(sa_column=Column(Text, primary_key=True))
    thread_id: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(sa_column=_ts(default_now=True))
    data: str = Field(sa_column=Column(JSONB, nullable=False))
    # Upload state (app.files.store): 'pending' until bytes arrive, 'uploading' while one
    # request streams them in, 'ready' once complete. Only 'ready' files are ever served.
    status: str = Field(
        default="pending",
        sa_column=Column(Text, nullable=False, server_default=text("'pending'")),
    )
    size_bytes: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    mime_type: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    uploaded_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )


class AttachmentBlobRow(SQLModel, table=True):
    """An attachment's bytes, in fixed-size chunks numbered from 0, apart from its metadata row.

    Uploads insert chunk by chunk and downloads read short ranges of chunks, so neither holds a
    whole file in memory. Deleting the attachment (or its thread) deletes its chunks.
    """

    __tablename__ = "chatkit_attachment_blobs"
    __table_args__ = (
        ForeignKeyConstraint(
            ["user_id", "attachment_id"],
            ["chatkit_attachments.user_id", "chatkit_attachments.id"],
            ondelete="CASCADE",
        ),
        CheckConstraint("chunk_no >= 0", name="chunk_no"),
    )

    user_id: str = Field(sa_column=Column(Text, primary_key=True))
    attachment_id: str = Field(sa_column=Column(Text, primary_key=True))
    chunk_no: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class FeedbackRow(SQLModel, table=True):
    __tablename__ = "chatkit_feedback"
    __table_args__ = (
        ForeignKeyConstraint(
            ["user_id", "thread_id", "item_id"],
            ["chatkit_items.user_id", "chatkit_items.thread_id", "chatkit_items.id"],
            ondelete="CASCADE",
        ),
        CheckConstraint("kind IN ('positive', 'negative')", name="kind"),
    )

    user_id: str = Field(sa_column=Column(Text, primary_key=True))
    thread_id: str = Field(sa_column=Column(Text, primary_key=True))
    item_id: str = Field(sa_column=Column(Text, primary_key=True))
    kind: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=_ts(default_now=True))


class RateLimitRow(SQLModel, table=True):
    """A user's request budget (app.pg.limits), as the generic cell rate algorithm keeps it: the
    theoretical arrival time of the next request. One row per user, updated in place."""

    __tablename__ = "chatkit_rate_limits"
    # No WAL: written on every request, and losing it in a crash only lifts a limit briefly.
    __table_args__ = {"prefixes": ["UNLOGGED"]}

    user_id: str = Field(sa_column=Column(Text, primary_key=True))
    tat: datetime = Field(sa_column=_ts())


class StreamLeaseRow(SQLModel, table=True):
    """A reply being streamed (app.pg.limits): counts toward the user's concurrent streams and
    claims its thread. Renewed while the stream runs; a crashed process's leases expire."""

    __tablename__ = "chatkit_stream_leases"
    __table_args__ = (UniqueConstraint("user_id", "thread_id"), {"prefixes": ["UNLOGGED"]})

    user_id: str = Field(sa_column=Column(Text, primary_key=True))
    id: str = Field(sa_column=Column(Text, primary_key=True))
    thread_id: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    expires_at: datetime = Field(sa_column=_ts())
    created_at: datetime = Field(sa_column=_ts(default_now=True))


class RunRow(SQLModel, table=True):
    """A resumable reply (app.chat.runs, docs/runs.md): its state, the last event logged, the
    heartbeat of the process running it, and whether a cancel was asked for. Written once per
    batch of events, so UNLOGGED like the limiter's rows (migration 0006 says why)."""

    __tablename__ = "chatkit_runs"
    __table_args__ = (
        # The running runs of a thread (migration 0008): what a reloaded page asks for.
        Index(None, "user_id", "thread_id", postgresql_where=text("state = 'running'")),
        {"prefixes": ["UNLOGGED"]},
    )

    user_id: str = Field(sa_column=Column(Text, primary_key=True))
    id: str = Field(sa_column=Column(Text, primary_key=True))
    thread_id: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    state: str = Field(sa_column=Column(Text, nullable=False, server_default=text("'running'")))
    last_seq: int = Field(sa_column=Column(Integer, nullable=False, server_default=text("0")))
    cancel_requested: bool = Field(
        sa_column=Column(Boolean, nullable=False, server_default=text("false"))
    )
    heartbeat_at: datetime = Field(sa_column=_ts(default_now=True))
    ended_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    created_at: datetime = Field(sa_column=_ts(default_now=True))


class RunEventRow(SQLModel, table=True):
    """One SSE event of a resumable reply, as sent (without its ``id:`` line)."""

    __tablename__ = "chatkit_run_events"
    __table_args__ = (
        ForeignKeyConstraint(
            ["user_id", "run_id"],
            ["chatkit_runs.user_id", "chatkit_runs.id"],
            ondelete="CASCADE",
        ),
        {"prefixes": ["UNLOGGED"]},
    )

    user_id: str = Field(sa_column=Column(Text, primary_key=True))
    run_id: str = Field(sa_column=Column(Text, primary_key=True))
    seq: int = Field(sa_column=Column(Integer, primary_key=True))
    data: str = Field(sa_column=Column(Text, nullable=False))
