"""One settings object for the app, the migrations and the CLI, read from the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


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

    @property
    def embedded_pg_dir(self) -> Path:
        return self.data_dir / "postgres"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
