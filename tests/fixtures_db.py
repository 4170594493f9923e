"""Database fixtures for the models/scheduler tests: one test body, run on SQLite and PostgreSQL.

Import the fixtures into a test module (`from tests.fixtures_db import db_url  # noqa: F401`).
"""

from __future__ import annotations

import pytest

from archive_asr.records import Segment, Timing, Transcript, Word
from archive_asr.settings import get_settings
from models.db import dispose_engines


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, data_dir, monkeypatch: pytest.MonkeyPatch) -> str:
    """The settings' database for this test: a SQLite file in data_dir, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{data_dir / 'archive.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    monkeypatch.setenv("ARCHIVE_ASR_DATABASE_URL", url)
    get_settings.cache_clear()
    yield url
    dispose_engines()  # release connections before pg_url drops the database


def make_transcript(sentences: list[tuple[float, float, str]], *, language: str = "en",
                    model: str = "tiny.en", wall_s: float = 1.0) -> Transcript:
    """A hand-built engine result: one segment per sentence, one word per space-separated token."""
    segments = []
    for start_s, end_s, text in sentences:
        tokens = text.split()
        step = (end_s - start_s) / max(len(tokens), 1)
        words = tuple(
            Word(start_s=start_s + i * step, end_s=start_s + (i + 1) * step, word=" " + tok, probability=0.9)
            for i, tok in enumerate(tokens)
        )
        segments.append(Segment(start_s=start_s, end_s=end_s, text=" " + text, avg_logprob=-0.2,
                                no_speech_prob=0.01, compression_ratio=1.3, temperature=0.0, words=words))
    duration_s = sentences[-1][1] if sentences else 0.0
    return Transcript(
        language=language,
        language_probability=0.98,
        duration_s=duration_s,
        text="".join(s.text for s in segments).strip(),
        segments=tuple(segments),
        timing=Timing(audio_s=duration_s, wall_s=wall_s, batch_size=8, device="cpu", model=model),
        options={"word_timestamps": True, "batch_size": 8},
    )
