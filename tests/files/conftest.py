"""The attachment tests' fixtures: settings with a public base URL and upload limit, a clock
the signed URLs follow, the attachment store on the backend's ``store``, an httpx client for
its /files routes and an SDK server recording what the model was sent."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from app.chat.converter import AttachmentConverter
from app.files.signing import UrlSigner, url_signing_secret
from app.files.store import PgAttachmentStore
from app.pg.store import PostgresStore
from app.settings import Settings
from tests.harness.files import BASE, MAX, Clock, RecordingServer, make_app

# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def settings(test_settings: Settings) -> Settings:
    return test_settings.model_copy(update={"public_base_url": BASE, "max_upload_bytes": MAX})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def attachments(store: PostgresStore, settings: Settings, clock: Clock) -> PgAttachmentStore:
    signer = UrlSigner(url_signing_secret(settings), BASE, settings.signed_url_ttl_seconds, clock)
    return PgAttachmentStore(store.pool, store, settings, signer).install()


@pytest.fixture
async def client(attachments: PgAttachmentStore) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(attachments))
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        yield c


@pytest.fixture
def server(store: PostgresStore, attachments: PgAttachmentStore) -> RecordingServer:
    return RecordingServer(store, attachments, AttachmentConverter(attachments))
