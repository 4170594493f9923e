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


def test_a_new_data_dir_and_database_are_private_an_existing_folder_keeps_its_mode(tmp_path, monkeypatch):
    from models.db import dispose_engines, get_engine

    new = tmp_path / "new" / "archive-asr"
    monkeypatch.setenv("ARCHIVE_ASR_DATA_DIR", str(new))
    monkeypatch.delenv("ARCHIVE_ASR_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    get_engine()  # creates and migrates archive.db
    try:
        assert oct(new.stat().st_mode & 0o777) == "0o700"
        assert oct((new / "archive.db").stat().st_mode & 0o777) == "0o600"
    finally:
        dispose_engines()

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o750)  # the user's own choice
    monkeypatch.setenv("ARCHIVE_ASR_DATA_DIR", str(shared))
    get_settings.cache_clear()
    get_settings()
    assert oct(shared.stat().st_mode & 0o777) == "0o750"
    get_settings.cache_clear()


def test_a_dotenv_that_overrides_settings_is_named_on_stderr(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "ARCHIVE_ASR_DATABASE_URL=postgresql://archive:s3cret@nas:5432/archive\n"
        "ARCHIVE_ASR_DATA_DIR=/ignored/the/environment/wins\nOTHER_TOOL=1\n"
    )
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.database_url.endswith("@nas:5432/archive") and settings.data_dir == data_dir
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / ".env") in err
    assert "ARCHIVE_ASR_DATABASE_URL" in err and "ARCHIVE_ASR_DATA_DIR" not in err and "s3cret" not in err

    (tmp_path / ".env").write_text("OTHER_TOOL=1\n")  # sets nothing of ours: not worth a line
    get_settings.cache_clear()
    get_settings()
    assert capsys.readouterr().err == ""
    get_settings.cache_clear()


def test_passwords_with_at_signs_are_masked_whole():
    from models.db import safe_url
    from worker.broker import redacted

    assert safe_url("postgresql://archive:p@ss@w0rd@db:5432/archive") == "postgresql://archive:***@db:5432/archive"
    assert redacted("redis://:p@ss/w0rd@nas:6379/0") == "redis://:***@nas:6379/0"
    assert redacted("redis://s3cret@nas:6379/0") == "redis://***@nas:6379/0"
    assert safe_url("postgresql://archive@db/archive") == "postgresql://archive@db/archive"
    assert safe_url("sqlite:////srv/a@b/archive.db") == "sqlite:////srv/a@b/archive.db"


@pytest.mark.parametrize("variable, url", [
    ("ARCHIVE_ASR_DATABASE_URL", "postgresql://archive:s3cret@db:54x2/archive"),
    ("ARCHIVE_ASR_BROKER_URL", "redis://:s3cret@nas:port/0"),
])
def test_a_port_that_is_not_a_number_is_one_line(data_dir, variable, url):
    import os
    import subprocess
    import sys

    from tests.fixtures_worker import REPO

    env = dict(os.environ, **{variable: url})
    out = subprocess.run([sys.executable, "-m", "cli", "status"], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    assert variable in out.stderr and "is not a number" in out.stderr
    assert "Traceback" not in out.stderr and "s3cret" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
