"""Every request type of the ChatKit protocol and every ``/files`` route, fuzzed against the real
app behind uvicorn (issue 19: no 500 from any input). The strategies are tests/harness/hostile_fuzz.py;
the world, the answer checks and the database checks are tests/hostile/test_hostile.py's (see its
docstring): two seeded users, and after every answer no 5xx (nor ``stream.error`` event), no
exception text, a JSON error body, no leak, the other user's rows untouched, no partial write.

A fixed budget: ``FUZZ_FIELDS`` + ``FUZZ_FILES`` examples, the same ones every run
(derandomized), scaled by ``HOSTILE_EXAMPLES``; ``HOSTILE_RANDOM=1`` explores new ones. A
failure prints the example (and a ``@reproduce_failure`` blob when exploring)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from sqlalchemy.ext.asyncio import AsyncEngine

from app.pg.pool import ConnectionPool
from app.settings import Settings
from tests.harness.hostile_cases import REQUEST_TYPES
from tests.harness.hostile_fuzz import (
    ROUTES,
    SDK_TYPES,
    FileCase,
    field_case,
    file_case,
    hostile,
    run_file_example,
)
from tests.harness.hostile_world import Case, World, run_example, seeded_world

FUZZ_FIELDS = 240
FUZZ_FILES = 120


@pytest.fixture(scope="module")
async def world(
    test_settings: Settings, engine: AsyncEngine, pool: ConnectionPool
) -> AsyncIterator[World]:
    async with seeded_world(test_settings, engine, pool, live=True) as seeded:
        yield seeded


def test_every_request_type_of_the_sdk_is_fuzzed() -> None:
    """The valid requests the fuzzer starts from cover the SDK's whole ``ChatKitReq`` union:
    a request type added by an SDK release fails here until the suite knows it."""
    assert set(REQUEST_TYPES) == set(SDK_TYPES)
    assert set(ROUTES) == {"upload_direct", "upload_signed", "download", "preview", "delete"}


@hostile(FUZZ_FIELDS)
@given(case=field_case())
async def test_fuzz_every_field_of_every_request_type(world: World, case: Case) -> None:
    await run_example(world, [case])


@hostile(FUZZ_FILES)
@given(case=file_case())
async def test_fuzz_every_files_route(world: World, case: FileCase) -> None:
    await run_file_example(world, case)
