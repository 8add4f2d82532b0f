"""``input.transcribe`` over /chatkit through a loopback OpenAI-compatible server: the audio
arrives intact, the size bound follows the body limit, every request counts against the rate
limit, provider failures are 4xx/503 (never a 500), and the offline model answers a clear 400."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError

from app.chat.dictation import COMPATIBLE_TRANSCRIPTION_MODEL
from app.settings import Settings, audio_bytes_fitting
from tests.conftest import MakeClient
from tests.harness.chatkit_client import ChatKitClient
from tests.harness.fake_openai import FakeTranscriptions
from tests.harness.loopback import serve

# Every byte value, many times over: a lossy path (text decoding, base64 quirks) would show.
AUDIO = bytes(range(256)) * 400


@dataclass
class Setup:
    fake: FakeTranscriptions
    base_url: str


@pytest.fixture
async def provider() -> AsyncIterator[Setup]:
    fake = FakeTranscriptions(text="Buy milk and call Bob.")
    async with serve(fake.app) as base:
        yield Setup(fake, f"{base}/v1")


async def dictation_client(
    make_client: MakeClient, provider: Setup, **settings: Any
) -> ChatKitClient:
    return await make_client(openai_base_url=provider.base_url, model_name="fake-chat", **settings)


def transcribe(audio: bytes, mime_type: str = "audio/webm;codecs=opus") -> dict[str, Any]:
    return {"audio_base64": base64.b64encode(audio).decode(), "mime_type": mime_type}


async def test_audio_reaches_the_provider_intact(make_client: MakeClient, provider: Setup) -> None:
    client = await dictation_client(make_client, provider)
    answer = await client.call("input.transcribe", transcribe(AUDIO))
    assert answer == {"text": "Buy milk and call Bob."}
    (upload,) = provider.fake.uploads
    assert upload["data"] == AUDIO
    assert upload["model"] == COMPATIBLE_TRANSCRIPTION_MODEL == "whisper-1"
    assert upload["filename"] == "dictation.webm"
    assert upload["content_type"] == "audio/webm"


async def test_transcription_model_setting(make_client: MakeClient, provider: Setup) -> None:
    client = await dictation_client(make_client, provider, transcription_model="my-whisper")
    await client.call("input.transcribe", transcribe(b"RIFF....WAVE", "audio/wav"))
    (upload,) = provider.fake.uploads
    assert (upload["model"], upload["filename"], upload["data"]) == (
        "my-whisper",
        "dictation.wav",
        b"RIFF....WAVE",
    )


async def test_offline_model_answers_a_clear_400(make_client: MakeClient) -> None:
    client = await make_client()  # no OPENAI_* settings: the offline model
    response = await client.request("input.transcribe", transcribe(AUDIO))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "unsupported"
    assert error["message"] == "Dictation needs a speech-to-text provider; this server has none."


async def test_bad_audio_is_400_and_never_sent(make_client: MakeClient, provider: Setup) -> None:
    client = await dictation_client(make_client, provider)
    good = base64.b64encode(AUDIO[:300]).decode()
    cases = [
        ({"audio_base64": good[:-2] + "!!", "mime_type": "audio/webm"}, "not valid base64"),
        ({"audio_base64": good + "A", "mime_type": "audio/webm"}, "not valid base64"),
        ({"audio_base64": "", "mime_type": "audio/webm"}, "The audio is empty."),
        ({"audio_base64": good, "mime_type": "video/mp4"}, "Unsupported audio format."),
        ({"audio_base64": good, "mime_type": "audio/x-unknown"}, "Unsupported audio format."),
    ]
    for params, says in cases:
        response = await client.request("input.transcribe", params)
        assert response.status_code == 400, (params["mime_type"], response.text)
        assert says in response.json()["error"]["message"]
    assert provider.fake.uploads == []


async def test_audio_bound_follows_the_body_limit(make_client: MakeClient, provider: Setup) -> None:
    body_limit = 4096
    fits = audio_bytes_fitting(body_limit)
    assert fits == 2304
    client = await dictation_client(make_client, provider, max_body_bytes=body_limit)
    assert client.settings.max_audio_bytes == fits

    await client.call("input.transcribe", transcribe(AUDIO[:fits]))
    assert provider.fake.uploads[-1]["data"] == AUDIO[:fits]
    # Past the audio bound but inside the body limit: refused by the audio check...
    just_over = json.dumps({"type": "input.transcribe", "params": transcribe(AUDIO[: fits + 3])})
    assert len(just_over) < body_limit
    response = await client.post(just_over.encode())
    assert response.status_code == 413
    assert response.json()["error"]["message"] == f"The audio may not exceed {fits} bytes."
    # ...and far past it, by the body limit before anything is parsed.
    response = await client.request("input.transcribe", transcribe(AUDIO[: fits * 2]))
    assert response.status_code == 413
    assert len(provider.fake.uploads) == 1


async def test_explicit_audio_bound_is_applied(make_client: MakeClient, provider: Setup) -> None:
    client = await dictation_client(make_client, provider, transcription_max_audio_bytes=1000)
    await client.call("input.transcribe", transcribe(AUDIO[:1000]))
    response = await client.request("input.transcribe", transcribe(AUDIO[:1001]))
    assert response.status_code == 413
    assert len(provider.fake.uploads) == 1


def test_audio_bound_larger_than_a_body_stops_startup() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(max_body_bytes=1024 * 1024, transcription_max_audio_bytes=1024 * 1024)
    message = str(info.value)
    assert "TRANSCRIPTION_MAX_AUDIO_BYTES=1048576 cannot arrive in a request of" in message
    assert "MAX_BODY_BYTES=1048576" in message and "at most 785664" in message
    assert Settings(transcription_max_audio_bytes=785664).max_audio_bytes == 785664
    assert Settings().max_audio_bytes == 785664


async def test_dictation_counts_against_the_rate_limit(
    make_client: MakeClient, provider: Setup
) -> None:
    client = await dictation_client(make_client, provider, rate_limit_per_minute=2)
    for _ in range(2):
        await client.call("input.transcribe", transcribe(AUDIO[:100]))
    response = await client.request("input.transcribe", transcribe(AUDIO[:100]))
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert len(provider.fake.uploads) == 2


async def test_provider_failures_are_not_500s(make_client: MakeClient, provider: Setup) -> None:
    client = await dictation_client(make_client, provider)
    provider.fake.status = 400  # e.g. audio it cannot decode
    response = await client.request("input.transcribe", transcribe(AUDIO[:100]))
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "The audio could not be transcribed."
    provider.fake.status = 503
    response = await client.request("input.transcribe", transcribe(AUDIO[:100]))
    assert response.status_code == 503
    assert "refused by the fake" not in response.text
    assert "retry-after" in response.headers
