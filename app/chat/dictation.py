"""Dictation: ``input.transcribe`` through the configured provider's ``audio/transcriptions``.

The provider follows the chat model's (app.chat.agent): ``OPENAI_BASE_URL`` (any OpenAI-compatible
server, default model ``whisper-1``), else ``OPENAI_API_KEY`` (OpenAI, default
``gpt-4o-mini-transcribe``), else none: the offline model cannot transcribe and the request is
a 400. The audio arrives base64-encoded inside the ``/chatkit`` body, so its bound follows
``MAX_BODY_BYTES`` (``Settings.max_audio_bytes``); every request, dictation included, is already
counted by the per-user rate limit before its body is read (app.http.endpoint).
"""

from __future__ import annotations

import base64
import binascii
import logging

import openai
from chatkit.types import AudioInput, InputTranscribeParams, TranscriptionResult
from openai import AsyncOpenAI

from app.errors import AppError, InvalidInputError, PayloadTooLargeError, ServiceUnavailableError
from app.settings import Settings

log = logging.getLogger(__name__)

NO_TRANSCRIPTION = "Dictation needs a speech-to-text provider; this server has none."

OPENAI_TRANSCRIPTION_MODEL = "gpt-4o-mini-transcribe"
COMPATIBLE_TRANSCRIPTION_MODEL = "whisper-1"

# The formats OpenAI's endpoint (and whisper servers copying it) accept, by media type; the
# provider tells the format from the uploaded file's name.
AUDIO_EXTENSIONS = {
    "audio/webm": "webm",
    "audio/ogg": "ogg",
    "audio/mp4": "mp4",
    "audio/m4a": "m4a",
    "audio/x-m4a": "m4a",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
}


def _media_type(mime_type: str) -> str:
    return mime_type.split(";", 1)[0].strip().lower()


class Transcriber:
    """Speech to text over one OpenAI client (closed with the app)."""

    def __init__(self, client: AsyncOpenAI, model: str, max_audio_bytes: int) -> None:
        self.client = client
        self.model = model
        self.max_audio_bytes = max_audio_bytes

    def check(self, params: InputTranscribeParams) -> None:
        """Refuse what the provider would refuse, before anything is decoded or sent."""
        if _media_type(params.mime_type) not in AUDIO_EXTENSIONS:
            raise InvalidInputError("Unsupported audio format.", field="params.mime_type")
        encoded = len(params.audio_base64)
        if encoded == 0:
            raise InvalidInputError("The audio is empty.", field="params.audio_base64")
        if encoded // 4 * 3 - 2 > self.max_audio_bytes:
            raise PayloadTooLargeError(
                f"The audio may not exceed {self.max_audio_bytes} bytes.",
            )

    def decode(self, params: InputTranscribeParams) -> AudioInput:
        """The audio bytes; strict base64 (the SDK's decoder silently skips bad characters)."""
        try:
            data = base64.b64decode(params.audio_base64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInputError(
                "The audio is not valid base64.", field="params.audio_base64"
            ) from None
        if not data:
            raise InvalidInputError("The audio is empty.", field="params.audio_base64")
        if len(data) > self.max_audio_bytes:
            raise PayloadTooLargeError(f"The audio may not exceed {self.max_audio_bytes} bytes.")
        return AudioInput(data=data, mime_type=params.mime_type)

    async def transcribe(self, audio: AudioInput) -> TranscriptionResult:
        media_type = _media_type(audio.mime_type)
        name = f"dictation.{AUDIO_EXTENSIONS[media_type]}"
        try:
            result = await self.client.audio.transcriptions.create(
                model=self.model, file=(name, audio.data, media_type), response_format="json"
            )
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            log.info("transcription refused by the provider", extra={"reason": exc.status_code})
            raise InvalidInputError("The audio could not be transcribed.") from exc
        except (
            openai.APIConnectionError,
            openai.RateLimitError,
            openai.InternalServerError,
        ) as exc:
            raise ServiceUnavailableError("Transcription is unavailable. Please retry.") from exc
        except openai.APIError as exc:  # our configuration (key, model name): a 500, logged
            raise AppError("transcription provider error") from exc
        return TranscriptionResult(text=result.text)

    async def aclose(self) -> None:
        await self.client.close()


def build_transcriber(settings: Settings) -> Transcriber | None:
    """The transcriber the settings ask for, or None when no provider is configured."""
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    if settings.openai_base_url:
        client = AsyncOpenAI(
            base_url=settings.openai_base_url,
            api_key=key or "not-needed",
            timeout=settings.openai_timeout_seconds,
            max_retries=1,
        )
        model = settings.transcription_model or COMPATIBLE_TRANSCRIPTION_MODEL
    elif key:
        client = AsyncOpenAI(api_key=key, timeout=settings.openai_timeout_seconds, max_retries=1)
        model = settings.transcription_model or OPENAI_TRANSCRIPTION_MODEL
    else:
        return None
    return Transcriber(client, model, settings.max_audio_bytes)
