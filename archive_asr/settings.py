"""The one settings object. No other module reads the environment.

Every field comes from an environment variable with the prefix ``ARCHIVE_ASR_`` (or a ``.env``
file in the working directory); see ``.env.example`` and the README for the list.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import platformdirs
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from archive_asr.errors import ConfigError

DEFAULT_MODEL = "base"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ARCHIVE_ASR_", env_file=".env", extra="ignore")

    # Where the SQLite database, the embedded broker's data and converted models live.
    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("archive-asr")))
    # SQLAlchemy URL; empty means a SQLite file in data_dir.
    database_url: str = ""
    # Celery broker URL (redis://...); empty means the embedded Valkey server in data_dir.
    broker_url: str = ""
    # Default Whisper model for new jobs: a name from `archive-asr models list`, a folder or a HF repo id.
    model: str = DEFAULT_MODEL
    # Windows per batch; 0 means chosen from the device's memory.
    batch_size: int = Field(default=0, ge=0)
    # Seconds a running job's lease lasts without renewal before the reconciler takes it back.
    lease_s: int = Field(default=20, ge=5)
    # Attempts before a job that keeps failing on transient errors is marked failed.
    max_attempts: int = Field(default=3, ge=1)
    # Flower: bind address and basic-auth "user:password" (empty: no auth, so localhost only).
    flower_address: str = "127.0.0.1"
    flower_port: int = 5555
    flower_basic_auth: str = ""
    log_level: str = "INFO"
    # Cache of converted MLX models; empty means data_dir/models.
    models_dir: Path | None = None

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str) -> str:
        if url and not url.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        return url

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, url: str) -> str:
        if url and not url.startswith(("redis://", "rediss://", "valkey://", "unix://", "redis+socket://")):
            raise ValueError("must be a redis:// (or valkey://) URL")
        return url

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'archive.db'}"

    @property
    def resolved_models_dir(self) -> Path:
        """Converted MLX models are cached here (models_dir, or data_dir/models)."""
        return self.models_dir or self.data_dir / "models"

    @property
    def broker_dir(self) -> Path:
        """The embedded Valkey server's pidfile, lock, socket and AOF data."""
        return self.data_dir / "broker"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read and validate the settings once per process; raise ConfigError with a readable reason."""
    try:
        settings = Settings()
    except ValidationError as e:
        problems = "; ".join(
            f"ARCHIVE_ASR_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from e
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings
