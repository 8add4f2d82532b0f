"""What every store call and agent run knows about the request it serves.

The ChatKit SDK hands our ``RequestContext`` to every store call and to the responder, so the
per-request parts that code below the endpoint needs travel on it, explicitly, rather than in
context variables: the admission a list request folds into its page's statement
(``page_fold``), the stream lease a reply claims its new thread with (``lease``) and the state
of a stream's steps (``stream``: its writes are settled, app.chat.settle, and whether its reply
is complete, app.chat.stream_outcome), and the rows a streaming request has read already
(``reads``), so that each is read once.
They are typed by what their reader does with them (the protocols below), so that the store
knows nothing of the limiter that makes them (app.pg.limits, app.pg.admission).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


# Checkable so that pydantic can build a schema of the context (the Agents SDK's run context
# holds it); instances of the dataclass are never revalidated, so nothing checks them per call.
@runtime_checkable
class PageFold(Protocol):
    """Work a list request leaves to the statement that reads its page (app.pg.store._page):
    the fold picks that statement's form and its extra parameters, and judges the outcome.
    Used once: ``pending`` is false once it has run (whatever its verdict)."""

    def pending(self, user_id: str) -> bool:
        """Whether it is still to run, for a page of ``user_id``'s."""
        ...

    def statement(self, forms: Any, first: bool) -> tuple[str, tuple[Any, ...]]:
        """The page statement among ``forms`` (first page or after a cursor) and the
        parameters that follow the page's own."""
        ...

    async def verdict(self, conn: Any, ok: bool) -> None:
        """Told whether the folded work let the page be read (``ok``); raises to refuse."""
        ...


@runtime_checkable
class ThreadClaim(Protocol):
    """A reply's hold on its thread (app.pg.limits.StreamLease): a reply that created a thread
    claims it, so that a message sent to it from elsewhere waits its turn."""

    async def attach(self, thread_id: str) -> None: ...


@dataclass(slots=True)
class StreamState:
    """What the steps of one stream share (app.chat.stream_outcome puts a fresh one on the
    context of each stream): a stream's writes are settled before its client learns how they
    went (app.chat.settle); ``reply_complete`` once the model's reply is complete and saved, so
    that a failure or a cancellation after it is not the reply's."""

    reply_complete: bool = False


@dataclass(slots=True)
class ReadCache:
    """Rows a streaming request has already read, served again to the store calls of the same
    request instead of a second round trip (app.pg.store): a turn's thread is read by the
    statement that opens the turn (app.pg.limits.Limits.begin_turn), then asked for by the
    endpoint's checks and by the SDK; its history is asked for by the reply (the last
    ``HISTORY_ITEMS``) and again by the SDK's agent runner (the last two). Raw rows, decoded
    afresh (threads) or copied (items) for every caller: callers may change what they get. The store forgets a thread's
    items when it writes one of them, and the thread when it saves or deletes it."""

    threads: dict[str, str] = field(default_factory=dict)
    # (thread id, order) -> the items of the first page read, and whether more followed.
    items: dict[tuple[str, str], tuple[list[Any], bool]] = field(default_factory=dict)

    def forget_items(self, thread_id: str) -> None:
        for key in [k for k in self.items if k[0] == thread_id]:
            del self.items[key]

    def forget_thread(self, thread_id: str) -> None:
        self.threads.pop(thread_id, None)
        self.forget_items(thread_id)


@dataclass(slots=True)
class RunClaim:
    """A resumable reply's claim on storing itself (docs/runs.md). ``taken_over`` once a
    follower in another process declared the run lost (its process was silent too long) and
    stored what the run had logged: the reply, still alive here after all, then stops without
    storing its partial reply a second time (app.chat.server.handle_stream_cancelled)."""

    taken_over: bool = False


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Built by the endpoint from the verified token; the store scopes every row by ``user_id``.
    The parts after ``request_id`` are the request's own state, never compared."""

    user_id: str
    locale: str | None = None
    request_id: str = ""
    page_fold: PageFold | None = field(default=None, compare=False, repr=False)
    lease: ThreadClaim | None = field(default=None, compare=False, repr=False)
    stream: StreamState | None = field(default=None, compare=False, repr=False)
    reads: ReadCache | None = field(default=None, compare=False, repr=False)
    run: RunClaim | None = field(default=None, compare=False, repr=False)
