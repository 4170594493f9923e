"""Shared fixtures: real services, real audio, an isolated data dir per test.

PostgreSQL and Redis tests skip on a laptop without them but fail under CI=true, where they must exist.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from archive_asr.settings import get_settings

REPO = Path(__file__).resolve().parents[1]
SHARED_AUDIO = REPO.parent / "shared" / "audio"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("ARCHIVE_ASR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ARCHIVE_ASR_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _need(service: str, available: bool) -> None:
    if available:
        return
    if IN_CI:
        pytest.fail(f"{service} must be running under CI=true")
    pytest.skip(f"{service} is not running here")


@pytest.fixture(scope="session")
def shared_audio() -> Path:
    """The shared test audio folder (../shared/audio beside the checkout)."""
    _need(f"shared audio at {SHARED_AUDIO}", SHARED_AUDIO.is_dir())
    return SHARED_AUDIO


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated ARCHIVE_ASR_DATA_DIR (SQLite database, broker files) for one test."""
    d = tmp_path / "data"
    monkeypatch.setenv("ARCHIVE_ASR_DATA_DIR", str(d))
    monkeypatch.delenv("ARCHIVE_ASR_DATABASE_URL", raising=False)
    monkeypatch.delenv("ARCHIVE_ASR_BROKER_URL", raising=False)
    # Converted models are expensive: share one cache across tests unless a test overrides it.
    monkeypatch.setenv("ARCHIVE_ASR_MODELS_DIR", str(REPO / ".data" / "test-models"))
    get_settings.cache_clear()
    yield d
    get_settings.cache_clear()


@pytest.fixture
def pg_url() -> str:
    """A fresh PostgreSQL schema-less database URL: a new database per test, dropped after."""
    _need("PostgreSQL at 127.0.0.1:5432", _port_open("127.0.0.1", 5432))
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"archive_asr_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def redis_url() -> str:
    """The real Redis at 127.0.0.1:6379, on a database number of its own for this test run."""
    _need("Redis at 127.0.0.1:6379", _port_open("127.0.0.1", 6379))
    return f"{REDIS_URL}/{int(os.environ.get('ARCHIVE_ASR_TEST_REDIS_DB', '7'))}"
