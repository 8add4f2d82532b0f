"""Where the server answers without the SDK's code path, the bytes are the SDK's own."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from chatkit.server import ChatKitServer
from chatkit.types import ActiveStatus, ClosedStatus, LockedStatus, Page, ThreadMetadata
from hypothesis import given, settings
from hypothesis import strategies as st

from app.chat.server import thread_list_json

storable_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))


class _Sdk(ChatKitServer[Any]):
    def respond(self, *args: Any) -> Any:
        raise NotImplementedError


SDK = _Sdk(store=None)  # type: ignore[arg-type]

threads = st.builds(
    ThreadMetadata,
    id=st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s),
    title=st.none() | storable_text,
    created_at=st.datetimes() | st.datetimes(timezones=st.just(UTC)),
    status=st.sampled_from(
        [ActiveStatus(), LockedStatus(reason="read only"), ClosedStatus(), LockedStatus()]
    ),
    allowed_image_domains=st.none() | st.lists(storable_text, max_size=3),
    metadata=st.dictionaries(storable_text, st.integers() | storable_text, max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(threads, max_size=5),
    has_more=st.booleans(),
    after=st.none() | storable_text,
)
def test_thread_list_matches_the_sdk(
    data: list[ThreadMetadata], has_more: bool, after: str | None
) -> None:
    page = Page[ThreadMetadata](data=data, has_more=has_more, after=after)
    expected = SDK._serialize(
        Page(has_more=has_more, after=after, data=[SDK._to_thread_response(t) for t in data])
    )
    assert thread_list_json(page) == expected


def test_thread_list_example() -> None:
    thread = ThreadMetadata(
        id="thr_1", title='Ünï "q"\n', created_at=datetime(2026, 1, 2, 3, 4, 5), metadata={"k": 1}
    )
    assert (
        thread_list_json(Page(data=[thread], has_more=True, after="thr_1"))
        == (
            '{"data":[{"title":"Ünï \\"q\\"\\n","id":"thr_1","created_at":"2026-01-02T03:04:05",'
            '"status":{"type":"active"},"metadata":{},"items":{"data":[],"has_more":false}}],'
            '"has_more":true,"after":"thr_1"}'
        ).encode()
    )
