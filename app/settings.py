"""One settings object for the app, the migrations and the CLI, read from the environment."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Attachments: what a user may upload unless ALLOWED_MIME_TYPES says otherwise.
DEFAULT_ALLOWED_MIME_TYPES = (
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/plain",
    "text/markdown",
    "text/csv",
    "application/json",
)


def _split_list(value: Any) -> Any:
    """Comma-separated environment values become lists; JSON lists are accepted too."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]

# The optional settings an empty value leaves unset (``Settings._blank_is_unset``), and those
# of them whose surrounding spaces are dropped (a URL or a name, never a secret).
_TRIMMED = frozenset(
    {"jwt_jwks_url", "jwt_issuer", "jwt_audience", "openai_base_url", "model_name"}
)
_BLANK_IS_UNSET = (
    *sorted(_TRIMMED),
    "jwt_secret",
    "openai_api_key",
    "max_output_tokens",
    "retention_days",
    "attachment_signing_secret",
    "identity_signing_key_file",
    "identity_previous_public_key_file",
    "transcription_model",
    "transcription_max_audio_bytes",
)

DEFAULT_INSTRUCTIONS = (
    "You are a helpful assistant inside a chat application. Answer clearly and concisely, "
    "use Markdown when it helps, and say so when you do not know something."
)


def normalise_database_url(url: str) -> str:
    """Accept the usual libpq spellings and point them at the asyncpg driver."""
    url = url.strip()
    for prefix in (
        "postgres://",
        "postgresql://",
        "postgresql+psycopg://",
        "postgresql+psycopg2://",
    ):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    if url.startswith("postgresql+asyncpg://"):
        return url
    raise ValueError("DATABASE_URL must be a postgresql:// or postgres:// URL")


# Room left in a dictation request for everything but the audio (type, MIME type, metadata).
TRANSCRIBE_ENVELOPE_BYTES = 1024


def audio_bytes_fitting(max_body_bytes: int) -> int:
    """The most audio an ``input.transcribe`` body of ``max_body_bytes`` can carry: base64 spends
    4 bytes per 3, and the JSON around it gets ``TRANSCRIBE_ENVELOPE_BYTES``."""
    return max(0, (max_body_bytes - TRANSCRIBE_ENVELOPE_BYTES) // 4 * 3)


class Settings(BaseSettings):
    """Every knob of the service; each field is an environment variable of the same name."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- database -----------------------------------------------------------
    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL; unset means the embedded server in DATA_DIR.",
    )
    data_dir: Path = Field(default=PROJECT_ROOT / ".data", description="Local state folder.")
    embedded_postgres_bin: Path | None = Field(
        default=None,
        description="Folder with initdb and pg_ctl for the embedded server (development); "
        "unset: a bundled wheel, else the machine's PostgreSQL.",
    )
    db_pool_size: int = Field(default=10, ge=1, le=1000)
    db_max_overflow: int = Field(default=5, ge=0, le=1000)
    db_pool_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to wait for a pooled connection."
    )
    db_statement_timeout_ms: int = Field(default=10_000, ge=0, description="0 disables it.")
    db_lock_timeout_ms: int = Field(default=5_000, ge=0, description="0 disables it.")
    db_connect_timeout: float = Field(default=5.0, gt=0)
    db_application_name: str = Field(
        default="chatkit-pg",
        description="application_name of the service's connections (pg_stat_activity).",
    )
    save_retry_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How long a reply's write whose outcome is unknown (the database stopped "
        "answering mid-statement) is tried again before the stream reports the error; 0 turns "
        "the retries off.",
    )

    # --- HTTP server -------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Interface uvicorn binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port uvicorn listens on.")
    workers: int = Field(default=1, ge=1, le=64, description="uvicorn worker processes.")
    chatkit_path: str = Field(default="/chatkit", description="Path of the ChatKit endpoint.")
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Largest accepted request body (bytes)."
    )
    sse_heartbeat_seconds: float = Field(
        default=15.0, gt=0, description="Idle seconds before an SSE comment keeps a stream open."
    )
    stream_buffer_bytes: int = Field(
        default=256 * 1024,
        ge=4096,
        description="Bytes of a reply that may wait for a client reading slower than the model "
        "writes (beyond what the sockets hold); one more and the stream is cut as on a "
        "disconnect (the reply so far is saved). Bounds each stream's memory.",
    )
    stream_stall_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Longest wait for a client to take the next part of a stream; a client "
        "that reads nothing for this long is cut as on a disconnect (the reply so far is "
        "saved), so it holds no stream slot or model run.",
    )
    cors_origins: CommaList = Field(
        default_factory=list, description="Browser origins allowed to call the API."
    )
    log_level: str = Field(default="INFO", description="Python log level of the JSON logs.")
    shutdown_grace_seconds: float = Field(
        default=10.0,
        ge=0,
        description="After SIGTERM, how long replies in progress (streams, resumable runs) "
        "may go on while the process refuses new work; then each ends with an error event "
        "and its partial reply is stored (docs/runs.md#rolling-restarts).",
    )
    ready_timeout_seconds: float = Field(
        default=3.0,
        gt=0,
        le=60,
        description="Seconds /readyz may take before it answers 503 (database unreachable).",
    )

    # --- authentication ----------------------------------------------------
    production: bool = Field(
        default=False, description="Refuse to start without a real JWT configuration."
    )
    jwt_secret: SecretStr | None = Field(
        default=None, description="Shared secret for HS256 tokens (shared-secret mode)."
    )
    jwt_jwks_url: str | None = Field(
        default=None, description="JWKS URL of the token issuer (JWKS mode)."
    )
    jwt_algorithms: CommaList = Field(
        default_factory=list,
        description="Accepted JWT algorithms; default HS256, or EdDSA,RS256,ES256 with JWKS.",
    )
    jwt_issuer: str | None = Field(default=None, description="Required exact `iss`, if set.")
    jwt_audience: str | None = Field(default=None, description="Required exact `aud`, if set.")
    jwt_user_claim: str = Field(default="sub", description="Claim holding the user id.")
    jwt_leeway_seconds: int = Field(
        default=30, ge=0, le=600, description="Clock skew allowed on exp/nbf/iat."
    )
    jwt_jwks_cache_seconds: float = Field(
        default=3600.0, gt=0, description="How long fetched JWKS keys are trusted."
    )
    jwt_jwks_min_refetch_seconds: float = Field(
        default=30.0, ge=0, description="At most one JWKS refetch per this many seconds."
    )
    jwt_jwks_timeout_seconds: float = Field(default=5.0, gt=0)
    jwt_jwks_max_stale_seconds: float = Field(
        default=86_400.0,
        gt=0,
        description="How long past JWT_JWKS_CACHE_SECONDS cached keys keep verifying tokens "
        "while the issuer is unreachable; after that, 503.",
    )

    # --- the agent ---------------------------------------------------------
    openai_api_key: SecretStr | None = Field(
        default=None, description="OpenAI key (Responses API), or the key of OPENAI_BASE_URL."
    )
    openai_base_url: str | None = Field(
        default=None, description="Any OpenAI-compatible server (Chat Completions API)."
    )
    openai_timeout_seconds: float = Field(default=120.0, gt=0)
    model_name: str | None = Field(
        default=None, description="Model name; required with OPENAI_BASE_URL."
    )
    agent_instructions: str = Field(
        default=DEFAULT_INSTRUCTIONS, description="System prompt of the agent."
    )
    agent_instructions_file: Path | None = Field(
        default=None, description="File holding the system prompt (wins over the text)."
    )
    agent_max_turns: int = Field(default=10, ge=1, le=100, description="Model calls per reply.")
    history_items: int = Field(
        default=40, ge=1, le=500, description="Most recent thread items sent to the model."
    )
    search_text_config: str = Field(
        default="simple",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$",
        description="PostgreSQL text-search configuration of thread search (docs/search.md).",
    )
    thread_titles: Literal["model", "first_message", "off"] = Field(
        default="model", description="How untitled threads get a title after the first reply."
    )
    mcp_server_urls: CommaList = Field(
        default_factory=list, description="Streamable-HTTP MCP servers whose tools the agent uses."
    )
    mcp_timeout_seconds: float = Field(default=10.0, gt=0)
    offline_word_delay_seconds: float = Field(
        default=0.03, ge=0, description="Pause between words of the offline demo model."
    )
    agents_tracing: bool = Field(
        default=False, description="Export Agents SDK traces to OpenAI (they hold message text)."
    )
    max_output_tokens: int | None = Field(
        default=4096,
        ge=1,
        description="Upper bound on tokens the model may write per model call of a reply.",
    )

    # --- per-user limits, kept in PostgreSQL so every backend process sees them ----------
    rate_limit_per_minute: int = Field(
        default=120,
        ge=0,
        description="Requests per user per minute (a burst of this many, then a steady rate); "
        "0 turns it off.",
    )
    max_streams_per_user: int = Field(
        default=3, ge=0, description="Replies a user may have streaming at once; 0 turns it off."
    )
    max_streams_per_process: int = Field(
        default=1000,
        ge=0,
        description="Replies one backend process streams at once; more get 503 + Retry-After "
        "before any work is done (shedding load beats failing streams already started). "
        "0 turns it off.",
    )
    stream_lease_seconds: float = Field(
        default=15.0,
        ge=3,
        description="A stream's claim on its thread and its user's stream count is renewed "
        "every third of this; a crashed process's claims expire after it (so short: a user "
        "whose replies were cut by a crash is not locked out for long).",
    )
    run_events_retention_seconds: float = Field(
        default=600.0,
        gt=0,
        description="How long a resumable reply's events stay readable after it ended "
        "(docs/runs.md); later, resuming it answers 404.",
    )
    run_flush_seconds: float = Field(
        default=0.1,
        gt=0,
        le=5,
        description="A resumable reply's events are logged in batches: at most this long "
        "after the first waiting one (or at RUN_FLUSH_EVENTS).",
    )
    run_log_pool_size: int = Field(
        default=4,
        ge=0,
        le=1000,
        description="Connections of a pool of the run log's own (its appends and resumers' "
        "reads), beside DB_POOL_SIZE's: under load a reply's batches wait there, growing, "
        "instead of queueing before the requests' statements. 0: they share the app's pool.",
    )
    run_flush_events: int = Field(
        default=64, ge=1, le=10_000, description="Events that make a batch of the run log."
    )
    run_heartbeat_seconds: float = Field(
        default=1.0,
        gt=0,
        description="A running resumable reply writes at least this often (its heartbeat; "
        "it also reads back cancels asked for through another process).",
    )
    run_dead_after_seconds: float = Field(
        default=5.0,
        gt=0,
        description="A running reply whose process wrote nothing for this long is declared "
        "lost by its resumers (one final error event); keep it several heartbeats long.",
    )
    run_poll_seconds: float = Field(
        default=0.1,
        gt=0,
        description="How often a resumer in another process than the reply's reads the log.",
    )
    run_max_seconds: float = Field(
        default=900.0,
        gt=0,
        description="A resumable reply, detached from its connection, is stopped (as by a "
        "cancel) after running this long.",
    )
    thread_busy_wait_seconds: float = Field(
        default=10.0,
        ge=0,
        description="How long a message to a thread that is still answering another waits "
        "its turn before it is refused as busy.",
    )

    @field_validator("database_url")
    @classmethod
    def _normalise_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return normalise_database_url(value)

    @field_validator("cors_origins", "jwt_algorithms", "mcp_server_urls", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("chatkit_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value):
            raise ValueError("CHATKIT_PATH must look like /chatkit")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    # --- attachments and data lifecycle -----------------------------------------------------
    public_base_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Public origin of this backend (the HTTPS origin behind nginx); "
        "absolute upload and preview URLs are built from it.",
    )
    max_upload_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1, description="Largest accepted attachment, in bytes."
    )
    allowed_mime_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_MIME_TYPES),
        description="Comma-separated MIME types users may upload; `type/*` allows a family.",
    )
    signed_url_ttl_seconds: int = Field(
        default=3600,
        ge=30,
        le=7 * 24 * 3600,
        description="Lifetime of signed upload and preview URLs (re-signed on every load).",
    )
    upload_orphan_hours: float = Field(
        default=24, gt=0, description="`prune` deletes uploads never attached after this long."
    )
    retention_days: float | None = Field(
        default=None,
        gt=0,
        description="`prune` deletes threads idle this long; unset keeps them forever.",
    )
    attachment_signing_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key for signed file URLs; unset keeps a random one in DATA_DIR "
        "(set it when several replicas serve the same database).",
    )
    attachment_text_max_bytes: int = Field(
        default=64 * 1024,
        ge=1,
        description="How much of a text attachment is sent to the model.",
    )
    max_attachments_per_message: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="Distinct files one message may carry (an id repeated counts once); more "
        "is a 400 before any work.",
    )
    model_input_file_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=0,
        description="File bytes (images, PDFs, text) one model request may carry, counted "
        "before base64. The newest files of the history are sent first; older ones that no "
        "longer fit are replaced by a note to the model. 0 sends none.",
    )

    @field_validator("public_base_url")
    @classmethod
    def _check_public_base_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")) or "?" in value or "#" in value:
            raise ValueError(
                "PUBLIC_BASE_URL must be an http(s) origin, e.g. https://chat.example.com"
            )
        return value

    @field_validator("allowed_mime_types", mode="before")
    @classmethod
    def _split_mime_types(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            types = [str(v).strip().lower() for v in value if str(v).strip()]
            if not types or any("/" not in t for t in types):
                raise ValueError(
                    "ALLOWED_MIME_TYPES must be a comma-separated list of type/subtype"
                )
            return types
        return value

    # --- identity tokens for MCP servers (app.chat.identity) ------------------------------
    identity_signing_key_file: Path | None = Field(
        default=None,
        description="PEM Ed25519 private key signing the identity tokens sent to MCP servers; "
        "required with PRODUCTION when MCP_SERVER_URLS is set (replicas share it); unset in "
        "development: generated once in DATA_DIR.",
    )
    identity_previous_public_key_file: Path | None = Field(
        default=None,
        description="PEM public key of the previous signing key, still served in the JWKS "
        "during a rotation.",
    )
    identity_ttl_seconds: int = Field(
        default=300, ge=10, le=300, description="Lifetime of an identity token (at most 300 s)."
    )

    # --- plugins and dictation -------------------------------------------------------------
    chatkit_plugins: CommaList = Field(
        default_factory=list,
        description="Comma-separated `module:attribute` plugins loaded at startup (app.chat.plugins, "
        "docs/customising.md).",
    )
    transcription_model: str | None = Field(
        default=None,
        description="Speech-to-text model of `input.transcribe`; default gpt-4o-mini-transcribe "
        "on OpenAI, whisper-1 with OPENAI_BASE_URL.",
    )
    transcription_max_audio_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Largest dictation audio (decoded bytes); default and upper bound: what "
        "fits base64-encoded in MAX_BODY_BYTES.",
    )

    @field_validator("chatkit_plugins", mode="before")
    @classmethod
    def _plugin_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator(*_BLANK_IS_UNSET, mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        """An empty or all-blank variable is an unset one: .env.example and the compose file
        leave optional settings empty. ``MAX_OUTPUT_TOKENS`` empty is no limit (its default is
        4096), which is why this is not pydantic-settings' ``env_ignore_empty`` (that would give
        the default) and why it runs on whitespace too."""
        if not isinstance(value, str):
            return value
        if not value.strip():
            return None
        return value.strip() if info.field_name in _TRIMMED else value

    @model_validator(mode="after")
    def _audio_fits_in_a_body(self) -> Settings:
        fits = audio_bytes_fitting(self.max_body_bytes)
        wanted = self.transcription_max_audio_bytes
        if wanted is not None and wanted > fits:
            raise ValueError(
                f"TRANSCRIPTION_MAX_AUDIO_BYTES={wanted} cannot arrive in a request of "
                f"MAX_BODY_BYTES={self.max_body_bytes} (base64 grows by 4/3): at most {fits}, "
                "or raise MAX_BODY_BYTES"
            )
        return self

    @property
    def max_audio_bytes(self) -> int:
        """The dictation audio bound actually applied (see ``audio_bytes_fitting``)."""
        wanted = self.transcription_max_audio_bytes
        return audio_bytes_fitting(self.max_body_bytes) if wanted is None else wanted

    @property
    def embedded_pg_dir(self) -> Path:
        return self.data_dir / "postgres"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
