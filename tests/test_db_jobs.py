"""The job-state API the workers use, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from models.base import utcnow
from models.db import session_scope
from models.jobs import (
    claim_job,
    expired_jobs,
    fail_job,
    finish_job,
    queued_jobs,
    release_expired,
    renew_lease,
    start_attempt,
    retry_job,
    transition,
)
from models.tables import File, Job, JobStatus, Segment, Transcript, Word, job_key
from tests.fixtures_db import db_url, make_transcript  # noqa: F401


def add_job(session, name: str = "a.wav", priority: int = 0) -> int:
    sha = f"{abs(hash(name)):064d}"[:64]
    job = Job(key=job_key(sha256=sha, model="tiny.en", language="en", word_timestamps=True),
              path=f"/archive/{name}", path_bytes=os.fsencode(f"/archive/{name}"), size=10, mtime=0.0,
              sha256=sha, model="tiny.en", language="en", word_timestamps=True, priority=priority,
              status=JobStatus.QUEUED, attempts=0)
    session.add(job)
    # the file on disk that holds this content, as enqueue records it (search finds current files)
    session.add(File(path=job.path, path_bytes=job.path_bytes, size=10, mtime_ns=0, sha256=sha))
    session.flush()
    return job.id


def test_claim_is_atomic_and_lease_expiry_lets_another_worker_take_over(db_url):
    with session_scope() as s:
        job_id = add_job(s)
    with session_scope() as s:
        job = claim_job(session=s, job_id=job_id, worker_host="mac-1", lease_s=30)
        assert job is not None and job.status == JobStatus.RUNNING and job.attempts == 0  # only waiting
    with session_scope() as s:  # work on the file begins: that is an attempt
        assert start_attempt(session=s, job_id=job_id, worker_host="mac-1")
        assert not start_attempt(session=s, job_id=job_id, worker_host="mac-2")
    with session_scope() as s:
        assert s.get(Job, job_id).attempts == 1
        assert claim_job(session=s, job_id=job_id, worker_host="mac-2", lease_s=30) is None
        assert renew_lease(session=s, job_id=job_id, worker_host="mac-1", lease_s=30)
        assert not renew_lease(session=s, job_id=job_id, worker_host="mac-2", lease_s=30)
        assert expired_jobs(session=s) == []
    with session_scope() as s:  # mac-1 dies: its lease runs out
        s.execute(update(Job).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with session_scope() as s:
        assert [j.id for j in expired_jobs(session=s)] == [job_id]
        job = claim_job(session=s, job_id=job_id, worker_host="mac-2", lease_s=30)
        assert job is not None and job.worker_host == "mac-2" and job.attempts == 1
        assert start_attempt(session=s, job_id=job_id, worker_host="mac-2")
        assert not renew_lease(session=s, job_id=job_id, worker_host="mac-1", lease_s=30)


def test_finish_writes_rows_and_replaces_an_earlier_attempt(db_url):
    with session_scope() as s:
        job_id = add_job(s)
        claim_job(session=s, job_id=job_id, worker_host="mac-1", lease_s=30)
        first = make_transcript([(0.0, 2.0, "a partial first attempt"), (2.0, 4.0, "that was cut short")])
        assert finish_job(session=s, job_id=job_id, transcript=first)
    with session_scope() as s:  # redelivered: the job runs again and finishes with other text
        s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.RUNNING))
        second = make_transcript([(0.0, 3.5, "And so my fellow Americans ask not")])
        assert finish_job(session=s, job_id=job_id, transcript=second)
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.DONE and job.finished_at is not None and job.lease_expires_at is None
        assert s.scalar(select(func.count()).select_from(Transcript)) == 1
        transcript = job.transcript
        assert "fellow americans" in transcript.text.lower()
        assert [seg.text.strip() for seg in transcript.segments] == ["And so my fellow Americans ask not"]
        words = transcript.segments[0].words
        assert [w.word.strip() for w in words][:3] == ["And", "so", "my"]
        assert all(w.start_s < w.end_s for w in words)
        assert s.scalar(select(func.count()).select_from(Word)) == 7
        assert s.scalar(select(func.count()).select_from(Segment)) == 1
        assert transcript.real_time_factor == pytest.approx(3.5)
        # the full-text index follows the rows: the first attempt's text is gone from it
        from models.search import search_segments

        assert search_segments(session=s, query="partial attempt") == []
        assert [h.job_id for h in search_segments(session=s, query="fellow americans")] == [job_id]
        # done is final for workers: a late duplicate does not overwrite it
        assert not finish_job(session=s, job_id=job_id, transcript=make_transcript([(0, 1, "late")]))


def test_fail_retries_until_the_attempt_cap(db_url, monkeypatch):
    monkeypatch.setenv("ARCHIVE_ASR_MAX_ATTEMPTS", "2")
    from archive_asr.settings import get_settings

    get_settings.cache_clear()
    with session_scope() as s:
        job_id = add_job(s)
    for attempt, expected in [(1, JobStatus.QUEUED), (2, JobStatus.FAILED)]:
        with session_scope() as s:
            assert claim_job(session=s, job_id=job_id, worker_host="mac-1", lease_s=30)
            assert start_attempt(session=s, job_id=job_id, worker_host="mac-1")
            assert s.get(Job, job_id, populate_existing=True).attempts == attempt
            assert fail_job(session=s, job_id=job_id, error="broker unreachable", retryable=True) == expected
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.FAILED and "broker unreachable" in job.error and "2 attempts" in job.error
        assert retry_job(session=s, job_id=job_id)
        assert s.get(Job, job_id).attempts == 0 and s.get(Job, job_id).status == JobStatus.QUEUED
        claim_job(session=s, job_id=job_id, worker_host="mac-1", lease_s=30)
        assert fail_job(session=s, job_id=job_id, error="cannot decode: not audio", retryable=False) == JobStatus.FAILED
        assert s.get(Job, job_id).error == "cannot decode: not audio"


def test_release_expired_and_queue_order(db_url):
    with session_scope() as s:
        low = add_job(s, "low.wav", priority=0)
        high = add_job(s, "high.wav", priority=5)
        assert [j.id for j in queued_jobs(session=s)] == [high, low]
        claim_job(session=s, job_id=low, worker_host="mac-1", lease_s=30)
        assert release_expired(session=s, job_id=low) is None  # lease still good
        s.execute(update(Job).where(Job.id == low).values(lease_expires_at=utcnow() - timedelta(seconds=5)))
        assert release_expired(session=s, job_id=low) == JobStatus.QUEUED
        assert "stopped renewing" in s.get(Job, low).error
        assert [j.id for j in queued_jobs(session=s, limit=1)] == [high]


def test_transitions_outside_the_table_are_refused(db_url):
    with session_scope() as s:
        job_id = add_job(s)
        with pytest.raises(ValueError):
            transition(session=s, job_id=job_id, to=JobStatus.RUNNING, from_={JobStatus.DONE})
        assert not transition(session=s, job_id=job_id, to=JobStatus.QUEUED, from_={JobStatus.FAILED})


def test_racing_claims_have_exactly_one_winner(db_url):
    """Eight workers receive the same job at once (a redelivered task): one runs it."""
    from concurrent.futures import ThreadPoolExecutor

    with session_scope() as s:
        job_id = add_job(s)

    def claim(i: int) -> bool:
        with session_scope() as s:
            return claim_job(session=s, job_id=job_id, worker_host=f"host-{i}", lease_s=30) is not None

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(claim, range(8)))
    assert sum(wins) == 1
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job.attempts == 0 and job.worker_host == f"host-{wins.index(True)}"  # claimed, not begun
