"""A ``Store`` wrapper that times every call into the ``chatkit_store_call_duration_seconds``
histogram; the wrapped store does the work. Anything else is delegated unchanged."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

from chatkit.store import Store, StoreItemType
from chatkit.types import ThreadMetadata
from prometheus_client import Histogram

from app.context import RequestContext
from app.pg.store import PostgresStore

P = ParamSpec("P")
R = TypeVar("R")
_TIMED: list[str] = []  # the names of the timed methods, each a label of the histogram


def _timed(
    method: Callable[Concatenate[Any, P], Awaitable[R]],
) -> Callable[Concatenate[MeteredStore, P], Coroutine[Any, Any, R]]:
    """``method`` (its signature taken from the store it names) as the wrapped store's own,
    timed under its name. A new function, not ``functools.wraps``: that would copy the
    abstract marker along with the name, and the class would stay abstract."""
    name = method.__name__
    _TIMED.append(name)

    async def timed(self: MeteredStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        try:
            result: R = await getattr(self.inner, name)(*args, **kwargs)
            return result
        finally:
            self._observe[name](time.perf_counter() - started)

    timed.__name__ = timed.__qualname__ = name
    timed.__doc__ = method.__doc__
    return timed


class MeteredStore(Store[RequestContext]):
    def __init__(self, inner: Store[Any], histogram: Histogram) -> None:
        self.inner = inner
        self._observe = {m: histogram.labels(m).observe for m in _TIMED}

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this class does not define (store-specific extras).
        return getattr(self.inner, name)

    def generate_thread_id(self, context: RequestContext) -> str:
        return self.inner.generate_thread_id(context)

    def generate_item_id(
        self, item_type: StoreItemType, thread: ThreadMetadata, context: RequestContext
    ) -> str:
        return self.inner.generate_item_id(item_type, thread, context)

    load_thread = _timed(Store.load_thread)
    save_thread = _timed(Store.save_thread)
    load_threads = _timed(Store.load_threads)
    delete_thread = _timed(Store.delete_thread)
    load_thread_items = _timed(Store.load_thread_items)
    add_thread_item = _timed(Store.add_thread_item)
    save_item = _timed(Store.save_item)
    load_item = _timed(Store.load_item)
    delete_thread_item = _timed(Store.delete_thread_item)
    save_attachment = _timed(Store.save_attachment)
    load_attachment = _timed(Store.load_attachment)
    delete_attachment = _timed(Store.delete_attachment)
    # Not in chatkit's Store: the settled writes (app.chat.settle) and the endpoint call them.
    save_feedback = _timed(PostgresStore.save_feedback)
    load_feedback = _timed(PostgresStore.load_feedback)
