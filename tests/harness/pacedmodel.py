"""The paced model the deployment tests and ``bench/deploy_bench.py`` serve under uvicorn
(``tests.harness.pacedmodel:paced_app``, in a child process; see ``tests/harness/deploy.py``).

``PacedModel`` is an ``agents.Model`` that streams its reply in deltas at a set pace. Each delta
carries the ``time.monotonic_ns()`` at which the server emitted it (system-wide on Linux), so a
client in another process can tell the pacing it saw from the pacing the server produced. The
user's message chooses the pace: ``pace deltas=20 interval_ms=50 lead_ms=0`` (the benchmark's
mode).

In LOCKSTEP mode (``... lockstep=<folder> wait_ms=60000``, written by ``deployharness.Lockstep``)
the model emits delta i+1 only once the client has acknowledged delta i (a file ``ack-<i>`` in
the folder, which the client creates when the event is in its hands), and marks every delta
with what happened: ``first``, ``acked`` or ``timeout`` (the acknowledgement had not come by
the deadline, one for the whole reply; the model then emits the rest without waiting, so the
stream still ends). Through a proxy that does not buffer every delta is ``acked`` whatever the
load on the machine; through one that buffers, delta 0 cannot reach the client before the
response ends, so delta 1 is ``timeout``. The tests assert that instead of timing margins.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents import Model

DELTA_MARK = re.compile(r"\[d(\d+)@(\d+)(?: (first|acked|timeout))?\]")


def ack_path(folder: Path, index: int) -> Path:
    """The file whose existence says the client has delta ``index``."""
    return folder / f"ack-{index}"


_PACE = re.compile(
    r"pace\s+deltas=(?P<deltas>\d+)\s+interval_ms=(?P<interval>[\d.]+)\s+lead_ms=(?P<lead>[\d.]+)"
    r"(?:\s+lockstep=(?P<lockstep>\S+)\s+wait_ms=(?P<wait>\d+))?"
)
LOCKSTEP_POLL_SECONDS = 0.002


@dataclass(frozen=True)
class Pace:
    deltas: int = 20
    interval_ms: float = 50
    lead_ms: float = 0
    lockstep: Path | None = None  # the folder of the client's acknowledgements
    wait_ms: float = 0


async def wait_for_ack(folder: Path, index: int, deadline: float) -> bool:
    """Until ``deadline`` (monotonic): has the client acknowledged delta ``index``?"""
    path = ack_path(folder, index)
    while not path.exists():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(LOCKSTEP_POLL_SECONDS)
    return True


def _last_user_text(input: Any) -> str:
    if isinstance(input, str):
        return input
    for item in reversed(list(input or [])):
        if not isinstance(item, dict) or item.get("role") != "user":
            continue
        content = item.get("content")
        if isinstance(content, str):
            return content
        texts = [c.get("text", "") for c in content or [] if isinstance(c, dict)]
        return " ".join(t for t in texts if t)
    return ""


class PacedModel(Model):
    """Streams ``deltas`` text deltas ``interval_ms`` apart, after ``lead_ms`` of silence; in
    lockstep, each delta after the first also waits for the client's acknowledgement of the one
    before (see the module's docstring)."""

    def __init__(self, deltas: int = 20, interval_ms: float = 50, lead_ms: float = 0) -> None:
        self.default = Pace(deltas, interval_ms, lead_ms)

    def _pace(self, input: Any) -> Pace:
        match = _PACE.search(_last_user_text(input))
        if not match:
            return self.default
        return Pace(
            int(match["deltas"]),
            float(match["interval"]),
            float(match["lead"]),
            Path(match["lockstep"]) if match["lockstep"] else None,
            float(match["wait"] or 0),
        )

    async def get_response(self, *args: Any, **kwargs: Any) -> Any:
        from agents.items import ModelResponse
        from agents.testing import assistant_message
        from agents.usage import Usage

        return ModelResponse(
            output=[assistant_message("Paced reply")], usage=Usage(requests=1), response_id=None
        )

    async def stream_response(  # type: ignore[override]
        self,
        system_instructions: str | None,
        input: Any,
        *args: Any,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        from openai.types.responses import (
            Response,
            ResponseCompletedEvent,
            ResponseContentPartAddedEvent,
            ResponseContentPartDoneEvent,
            ResponseCreatedEvent,
            ResponseOutputItemAddedEvent,
            ResponseOutputItemDoneEvent,
            ResponseOutputMessage,
            ResponseOutputText,
            ResponseTextDeltaEvent,
            ResponseTextDoneEvent,
            ResponseUsage,
        )
        from openai.types.responses.response_usage import (
            InputTokensDetails,
            OutputTokensDetails,
        )

        pace = self._pace(input)
        deltas = pace.deltas
        item_id = f"msg_paced_{time.monotonic_ns()}"
        seq = 0

        def nxt() -> int:
            nonlocal seq
            seq += 1
            return seq - 1

        def response(status: Any, output: list[Any]) -> Response:
            return Response(
                id=f"resp_{item_id}",
                created_at=time.time(),
                model="paced-model",
                object="response",
                output=output,
                tool_choice="none",
                tools=[],
                top_p=None,
                parallel_tool_calls=False,
                status=status,
                usage=ResponseUsage(
                    input_tokens=1,
                    output_tokens=deltas,
                    total_tokens=deltas + 1,
                    input_tokens_details=InputTokensDetails.model_validate(
                        {"cached_tokens": 0, "cache_write_tokens": 0}
                    ),
                    output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
                ),
            )

        def message(status: Any, text: str | None) -> ResponseOutputMessage:
            content = [] if text is None else [self._text(text)]
            return ResponseOutputMessage(
                id=item_id, type="message", role="assistant", status=status, content=content
            )

        yield ResponseCreatedEvent(
            type="response.created", response=response("in_progress", []), sequence_number=nxt()
        )
        yield ResponseOutputItemAddedEvent(
            type="response.output_item.added",
            item=message("in_progress", None),
            output_index=0,
            sequence_number=nxt(),
        )
        yield ResponseContentPartAddedEvent(
            type="response.content_part.added",
            item_id=item_id,
            output_index=0,
            content_index=0,
            part=ResponseOutputText(type="output_text", text="", annotations=[], logprobs=[]),
            sequence_number=nxt(),
        )
        if pace.lead_ms:
            await asyncio.sleep(pace.lead_ms / 1000)
        deadline = time.monotonic() + pace.wait_ms / 1000
        parts = []
        for i in range(deltas):
            if i:
                await asyncio.sleep(pace.interval_ms / 1000)
            status = ""
            if pace.lockstep is not None:
                acked = i == 0 or await wait_for_ack(pace.lockstep, i - 1, deadline)
                status = " first" if i == 0 else " acked" if acked else " timeout"
            piece = f"[d{i}@{time.monotonic_ns()}{status}] "
            parts.append(piece)
            yield ResponseTextDeltaEvent(
                type="response.output_text.delta",
                item_id=item_id,
                output_index=0,
                content_index=0,
                delta=piece,
                logprobs=[],
                sequence_number=nxt(),
            )
        text = "".join(parts)
        yield ResponseTextDoneEvent(
            type="response.output_text.done",
            item_id=item_id,
            output_index=0,
            content_index=0,
            text=text,
            logprobs=[],
            sequence_number=nxt(),
        )
        yield ResponseContentPartDoneEvent(
            type="response.content_part.done",
            item_id=item_id,
            output_index=0,
            content_index=0,
            part=self._text(text),
            sequence_number=nxt(),
        )
        done = message("completed", text)
        yield ResponseOutputItemDoneEvent(
            type="response.output_item.done", item=done, output_index=0, sequence_number=nxt()
        )
        yield ResponseCompletedEvent(
            type="response.completed", response=response("completed", [done]), sequence_number=nxt()
        )

    @staticmethod
    def _text(text: str) -> Any:
        from openai.types.responses import ResponseOutputText

        return ResponseOutputText(type="output_text", text=text, annotations=[], logprobs=[])


def paced_app() -> Any:
    """uvicorn factory: the production app, with the paced model instead of a real one."""
    from app.main import create_app

    return create_app(None, model=PacedModel())
