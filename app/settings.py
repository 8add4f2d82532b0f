"""One settings object for the app, the migrations and the CLI, read from the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
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


class Settings(BaseSettings):
    """Every knob of the service; each field is an environment variable of the same name."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- database -----------------------------------------------------------
    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL; unset means the embedded server in DATA_DIR.",
    )
    data_dir: Path = Field(default=PROJECT_ROOT / ".data", description="Local state folder.")
    db_pool_size: int = Field(default=10, ge=1, le=1000)
    db_max_overflow: int = Field(default=5, ge=0, le=1000)
    db_pool_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to wait for a pooled connection."
    )
    db_statement_timeout_ms: int = Field(default=10_000, ge=0, description="0 disables it.")
    db_lock_timeout_ms: int = Field(default=5_000, ge=0, description="0 disables it.")
    db_connect_timeout: float = Field(default=5.0, gt=0)

    @field_validator("database_url")
    @classmethod
    def _normalise_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return normalise_database_url(value)

    # --- attachments and data lifecycle (issue 5) -----------------------------------------
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

    @field_validator("retention_days", "attachment_signing_secret", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def embedded_pg_dir(self) -> Path:
        return self.data_dir / "postgres"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
