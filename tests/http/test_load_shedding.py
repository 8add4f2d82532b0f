"""MAX_STREAMS_PER_PROCESS: a saturated process refuses new replies up front (503 +
Retry-After, nothing stored) instead of accepting them and failing them mid-stream."""

from __future__ import annotations

import asyncio

from tests.conftest import MakeClient
from tests.harness.chatkit_client import of_type, user_input


async def test_streams_over_the_process_cap_are_shed_before_any_work(
    make_client: MakeClient,
) -> None:
    client = await make_client(max_streams_per_process=2, offline_word_delay_seconds=0.03)
    runtime = client.app.state.runtime
    slow = [
        asyncio.create_task(client.stream("threads.create", {"input": user_input("hi")}, user=user))
        for user in ("u1", "u2")
    ]
    async with asyncio.timeout(10):
        while runtime.open_streams < 2:
            await asyncio.sleep(0.01)

    shed = await client.request("threads.create", {"input": user_input("me too")}, user="u3")
    assert shed.status_code == 503
    assert shed.headers["retry-after"] == "2"
    assert shed.json()["error"]["code"] == "unavailable"
    # Non-streaming requests are still served meanwhile.
    assert (await client.call("threads.list", {}, user="u3"))["data"] == []

    for events in await asyncio.gather(*slow):
        assert of_type(events, "thread.item.done")
    assert runtime.open_streams == 0
    # Capacity is back, and the shed request left nothing behind to clean up.
    thread_id, _ = await client.create_thread("again", user="u3")
    listed = await client.call("threads.list", {}, user="u3")
    assert [t["id"] for t in listed["data"]] == [thread_id]


async def test_a_burst_cannot_slip_past_the_cap(make_client: MakeClient) -> None:
    """The slot is taken at the check, before the awaits that follow it (precheck, lease)."""
    client = await make_client(max_streams_per_process=1, offline_word_delay_seconds=0.01)
    answers = await asyncio.gather(
        *(
            client.request("threads.create", {"input": user_input("hi")}, user=f"u{n}")
            for n in range(6)
        )
    )
    assert sorted(a.status_code for a in answers) == [200, 503, 503, 503, 503, 503]
    assert client.app.state.runtime.open_streams == 0
