"""Settings are read once, validated, and fail with a message that names the variable."""

import pytest

from archive_asr.errors import ConfigError
from archive_asr.settings import get_settings


def test_defaults_use_sqlite_in_data_dir(data_dir):
    settings = get_settings()
    assert settings.resolved_database_url == f"sqlite:///{data_dir / 'archive.db'}"
    assert settings.model == "base"
    assert data_dir.is_dir()


def test_bad_database_url_names_the_variable(data_dir, monkeypatch):
    monkeypatch.setenv("ARCHIVE_ASR_DATABASE_URL", "mysql://nope")
    get_settings.cache_clear()
    with pytest.raises(ConfigError, match="ARCHIVE_ASR_DATABASE_URL"):
        get_settings()


def test_negative_batch_size_is_rejected(data_dir, monkeypatch):
    monkeypatch.setenv("ARCHIVE_ASR_BATCH_SIZE", "-3")
    get_settings.cache_clear()
    with pytest.raises(ConfigError, match="ARCHIVE_ASR_BATCH_SIZE"):
        get_settings()


def test_install_is_lean():
    """mlx-whisper declares torch; the install must not have pulled it in."""
    import importlib.util

    assert importlib.util.find_spec("torch") is None
    assert importlib.util.find_spec("mlx_whisper") is not None
