"""The tables: files (the path cache), jobs, transcripts, segments, words.

Deduplication works by content: `files` maps every path ever scanned to the sha256 of its
content (with size and mtime, so an unchanged file is never rehashed); a job is unique per
(sha256, model, language, word timestamps), recorded in `jobs.key`. Identical content at two
paths is one job; both paths reach its transcript through `files.sha256 = jobs.sha256`.
"""

from __future__ import annotations

import os
from datetime import datetime
from enum import Enum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, UTCDateTime, utcnow


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


def job_key(*, sha256: str, model: str, language: str | None, word_timestamps: bool) -> str:
    """What makes two jobs the same work: content, model, requested language, word timestamps."""
    return f"{sha256}:{model}:{language or 'auto'}:{'words' if word_timestamps else 'nowords'}"


class File(Base):
    """One path on disk as last scanned; many paths may share one content hash."""

    __tablename__ = "files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The file system's bytes (os.fsencode): lossless for names that are not valid UTF-8.
    path_bytes: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    # The same path as text for SQL and people (undecodable bytes as \xNN escapes).
    path: Mapped[str] = mapped_column(Text, index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    duration_s: Mapped[float | None] = mapped_column(Float)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    @property
    def fs_path(self) -> str:
        return os.fsdecode(self.path_bytes)


class Job(Base):
    """One piece of work: transcribe this content with this model. Status moves only via models.jobs."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(400), unique=True)
    # The path the worker reads (kept current when the file moves); path_bytes is the lossless form.
    path: Mapped[str] = mapped_column(Text, index=True)
    path_bytes: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime: Mapped[float] = mapped_column(Float)  # seconds since the epoch
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    duration_s: Mapped[float | None] = mapped_column(Float)  # from the container header at enqueue
    status: Mapped[JobStatus] = mapped_column(
        SAEnum(JobStatus, name="job_status", native_enum=False, length=16,
               values_callable=lambda e: [m.value for m in e], validate_strings=True,
               create_constraint=True),
        default=JobStatus.QUEUED,
        index=True,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)  # higher runs sooner
    model: Mapped[str] = mapped_column(String(200))
    language: Mapped[str | None] = mapped_column(String(16))  # None: detect
    word_timestamps: Mapped[bool] = mapped_column(Boolean, default=True)
    worker_host: Mapped[str | None] = mapped_column(String(255), index=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)

    transcript: Mapped[Transcript | None] = relationship(back_populates="job", passive_deletes=True)

    __table_args__ = (Index("ix_jobs_status_priority", "status", "priority"),)

    @property
    def fs_path(self) -> str:
        """The path to open (str, surrogate-escaped where the name is not UTF-8)."""
        return os.fsdecode(self.path_bytes)


class Transcript(Base):
    __tablename__ = "transcripts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    language: Mapped[str | None] = mapped_column(String(16), index=True)
    language_probability: Mapped[float | None] = mapped_column(Float)
    text: Mapped[str] = mapped_column(Text)
    duration_s: Mapped[float] = mapped_column(Float)
    model: Mapped[str] = mapped_column(String(200))
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # engine options used
    wall_s: Mapped[float] = mapped_column(Float)
    real_time_factor: Mapped[float] = mapped_column(Float)  # audio seconds per wall second
    device: Mapped[str] = mapped_column(String(200))
    batch_size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Seconds the decoder delivered, silence standing in for damaged stretches included (None: before 0002).
    decoded_s: Mapped[float | None] = mapped_column(Float)
    # What the decoder had to say (truncated file, corrupt middle), one line each; None: nothing. A
    # transcript with warnings is partial: `status` lists it.
    warnings: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="transcript")

    @property
    def warning_lines(self) -> list[str]:
        return self.warnings.splitlines() if self.warnings else []
    segments: Mapped[list[Segment]] = relationship(
        back_populates="transcript", order_by="Segment.index", passive_deletes=True
    )


class Segment(Base):
    __tablename__ = "segments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transcript_id: Mapped[int] = mapped_column(ForeignKey("transcripts.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    start_s: Mapped[float] = mapped_column(Float)
    end_s: Mapped[float] = mapped_column(Float)
    text: Mapped[str] = mapped_column(Text)
    avg_logprob: Mapped[float] = mapped_column(Float)
    no_speech_prob: Mapped[float] = mapped_column(Float)
    compression_ratio: Mapped[float] = mapped_column(Float)
    temperature: Mapped[float] = mapped_column(Float)

    transcript: Mapped[Transcript] = relationship(back_populates="segments")
    words: Mapped[list[Word]] = relationship(
        back_populates="segment", order_by="Word.index", passive_deletes=True
    )

    __table_args__ = (UniqueConstraint("transcript_id", "index"),)


class Word(Base):
    __tablename__ = "words"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    segment_id: Mapped[int] = mapped_column(ForeignKey("segments.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    start_s: Mapped[float] = mapped_column(Float)
    end_s: Mapped[float] = mapped_column(Float)
    word: Mapped[str] = mapped_column(Text)  # as Whisper spells it: leading space, punctuation
    probability: Mapped[float] = mapped_column(Float)

    segment: Mapped[Segment] = relationship(back_populates="words")

    __table_args__ = (
        UniqueConstraint("segment_id", "index"),
        Index("ix_words_segment_id_start_s", "segment_id", "start_s"),
    )
