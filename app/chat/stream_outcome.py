"""What a stream tells its client about the reply agrees with what the thread keeps.

``ConsistentStreams`` is the SDK's server with two of its stream steps changed:

* A stream's writes are settled (app.chat.settle): the mark is set in the stream's own task, so it
  reaches no other request.
* Once the reply is complete and saved (``reply_complete``, set by the responder in the
  stream's task), nothing after it (its title, the thread's save) ends the stream in an
  error: the client would show as failed, and offer to retry, a reply the thread keeps. Such a
  failure is only logged (the SDK logs its exception too); the title is then simply not there,
  on either side.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextvars import ContextVar

from chatkit.server import ChatKitServer
from chatkit.types import ErrorEvent, StreamingReq, ThreadMetadata, ThreadStreamEvent

from app.chat.settle import settle_writes_here
from app.context import RequestContext

log = logging.getLogger(__name__)

reply_complete: ContextVar[bool] = ContextVar("reply_complete", default=False)
"""Set once the model's reply is complete and saved (in the stream's own task): a failure
after it is not the reply's, and a cancellation after it (while the title is made) has no
partial reply to save and nothing to mark."""


class ConsistentStreams(ChatKitServer[RequestContext]):
    async def _process_streaming(
        self, request: StreamingReq, context: RequestContext
    ) -> AsyncGenerator[bytes, None]:
        """The SDK's, with the stream's writes settled from its first step."""
        settle_writes_here()
        try:
            async for event in self._process_streaming_impl(request, context):
                yield b"data: " + self._serialize(event) + b"\n\n"
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Error while generating streamed response")
            raise

    async def _process_events(
        self,
        thread: ThreadMetadata,
        context: RequestContext,
        stream: Callable[[], AsyncIterator[ThreadStreamEvent]],
    ) -> AsyncIterator[ThreadStreamEvent]:
        """The SDK's, except that a failure after the complete reply is only logged."""
        try:
            async for event in super()._process_events(thread, context, stream):
                if isinstance(event, ErrorEvent) and reply_complete.get():
                    log.warning("a step after the complete reply failed; the reply stands")
                    continue
                yield event
        except Exception as exc:
            if not reply_complete.get():
                raise
            log.warning(
                "a step after the complete reply failed; the reply stands",
                extra={"reason": type(exc).__name__},
            )
