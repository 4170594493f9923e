"""The one settings object. No other module reads the environment.

Every field comes from an environment variable with the prefix ``ARCHIVE_ASR_`` (or a ``.env``
file in the working directory, named on stderr when it sets anything); see ``.env.example`` and
the README for the list.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

import platformdirs
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from archive_asr.errors import ConfigError

DEFAULT_MODEL = "base"
ENV_PREFIX = "ARCHIVE_ASR_"
ENV_FILE = ".env"
PRIVATE_DIR_MODE = 0o700  # new data folders: transcripts, paths and the broker's password are this user's


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) with mode 0700 if it does not exist; an existing folder
    keeps the permissions its owner gave it."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, PRIVATE_DIR_MODE)  # mkdir's mode is cut by the umask; chmod is not
    return path


def masked_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs.

    The credentials end at the last '@' of the authority, so a password holding an unescaped '@'
    (or ':' or '/') is hidden whole; a URL that can't be split is hidden from '://' to its last '@'.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or rest.startswith("/") or "@" not in rest:
        return url
    creds, host = rest.rsplit("@", 1)
    user, colon, _password = creds.partition(":")
    if "/" in user or "?" in user:  # not a user name: the split went wrong, hide it all
        return f"{scheme}://***@{host}"
    if not colon:  # "redis://secret@host": Redis reads a lone user-info part as the password
        return f"{scheme}://***@{host}" if scheme.startswith(("redis", "valkey", "unix")) else url
    return f"{scheme}://{user}:***@{host}"


def _check_port(url: str) -> None:
    """A port that is not a number is one clear line at start, not a traceback deep in a driver."""
    rest = url.partition("://")[2]
    if not rest or rest.startswith("/"):
        return
    host = rest.rsplit("@", 1)[-1].split("/", 1)[0].split("?", 1)[0]
    if host.startswith("["):  # [IPv6]:port
        host = host.rsplit("]", 1)[-1]
    elif host.count(":") > 1:
        return
    port = host.rpartition(":")[2] if ":" in host else ""
    if port and not port.isdigit():
        raise ValueError(f"port {port!r} is not a number")
    if port and not 0 < int(port) < 65536:
        raise ValueError(f"port {port} is out of range")


SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
              "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_bytes(value: str) -> int:
    """"6GiB", "6 GB", "512M", "1.5g" -> bytes; a size that can't be read raises ValueError."""
    text = value.strip().lower().replace(" ", "")
    number = text.rstrip("kmgtib")
    unit = text[len(number):]
    try:
        size = float(number)
    except ValueError:
        size = -1.0
    if unit not in SIZE_UNITS or size <= 0:
        raise ValueError(f"{value!r} is not a memory size (e.g. 6GiB, 512MiB)")
    return int(size * SIZE_UNITS[unit])


def check_basic_auth(value: str) -> str:
    """Flower's basic auth: "user:password", several joined by commas; no part may be empty."""
    for credential in value.split(","):
        user, colon, password = credential.partition(":")
        if not colon or not user.strip() or not password.strip():
            raise ValueError(
                "must be user:password with a non-empty user name and password (several: u1:p1,u2:p2; "
                "no comma inside a password)"
            )
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=ENV_FILE, extra="ignore")

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
    # Cut a long file into stretches of at least this many seconds to fill batch rows that would
    # idle (a lone file, the tail of a queue); 0 = never: every transcript is sequential Whisper's.
    min_region_s: float = Field(default=0.0, ge=0.0)
    # The accelerator a worker uses: "auto" (the GPU if MLX has one, else the CPU), "cpu", or
    # "gpu:N" (the N-th GPU; CUDA machines may have several, a Mac has gpu:0).
    device: str = "auto"
    # Memory a worker may plan its weights and batch rows in, e.g. "6GiB" or "512MiB"; empty means
    # a share of what the device offers (see engine.memory).
    memory_budget: str = ""
    # Seconds a running job's lease lasts without renewal before the reconciler takes it back.
    lease_s: int = Field(default=20, ge=5)
    # Attempts before a job that keeps failing on transient errors is marked failed.
    max_attempts: int = Field(default=3, ge=1)
    # Flower: bind address and basic-auth "user:password" (empty: no auth, so localhost only and no API).
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
        _check_port(url)
        return url

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, url: str) -> str:
        if url and not url.startswith(("redis://", "rediss://", "valkey://", "unix://", "redis+socket://")):
            raise ValueError("must be a redis:// (or valkey://) URL")
        _check_port(url)
        return url

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "gpu") or (value.startswith("gpu:") and value[4:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, gpu or gpu:N (N = 0, 1, ...)")

    @field_validator("memory_budget")
    @classmethod
    def _memory_size(cls, value: str) -> str:
        if value:
            parse_bytes(value)
        return value

    @field_validator("flower_basic_auth")
    @classmethod
    def _no_empty_credentials(cls, value: str) -> str:
        return check_basic_auth(value) if value else value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        path = str(self.data_dir / "archive.db")
        if any(c in path for c in "%?"):  # characters a URL reads as escapes or a query: escape them
            from sqlalchemy.engine import URL

            return URL.create("sqlite", database=path).render_as_string()
        return f"sqlite:///{path}"

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
    _name_env_file()
    private_dir(settings.data_dir)
    return settings


def _name_env_file() -> None:
    """Say (one line on stderr) when a .env in the working directory sets settings the environment doesn't."""
    path = Path(ENV_FILE)
    if not path.is_file():
        return
    from dotenv import dotenv_values

    try:
        values = dotenv_values(path)
    except (OSError, UnicodeDecodeError):
        return
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    environ = {k.upper() for k in os.environ}
    used = sorted({k.upper() for k in values if k.upper() in known and k.upper() not in environ})
    if used:
        print(f"archive-asr: settings from {path.resolve()}: {', '.join(used)}", file=sys.stderr)
