"""No job is ever lost: real workers running tiny.en, killed with SIGKILL; the broker flushed mid-run.

Real Redis (each test on its own database number), real PostgreSQL, real clips from ../shared/audio.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from tests.fixtures_worker import (
    KILL_TEST_CLIPS,
    SHORT_CLIPS,
    clean_redis,
    copy_clips,
    enqueue,
    job_rows,
    wait_for,
    wait_until_settled,
    worker_env,
    workers,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _transcript_text(path_suffix: str) -> str:
    from sqlalchemy import select

    from models.db import session_scope
    from models.tables import Job, Transcript

    with session_scope() as session:
        return session.scalar(select(Transcript.text).join(Job).where(Job.path.endswith(path_suffix)))


@pytest.mark.postgres
def test_sigkilled_worker_loses_nothing(redis_url: str, pg_url: str, shared_audio: Path, tmp_path: Path, monkeypatch):
    url = redis_url.rsplit("/", 1)[0] + "/9"
    clean_redis(url)
    env = worker_env(monkeypatch, tmp_path / "data", url, database_url=pg_url)
    audio = tmp_path / "audio"
    good = copy_clips(shared_audio, audio, KILL_TEST_CLIPS)
    corrupt = audio / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\xff\xff\xff\x7fWAVEfmt " + bytes(range(256)) * 16)
    text = audio / "notes.wav"
    text.write_text("These are the archivist's notes, not audio.\n" * 20)
    # Zero bytes by the time a worker opens it (enqueue itself skips files that are empty already).
    emptied = audio / "timit.ogg"
    emptied.write_bytes((shared_audio / "formats" / "timit_LDC93S1.ogg").read_bytes())
    ids = enqueue([audio])
    emptied.write_bytes(b"")
    assert len(ids) == 20

    # Four rows (six jobs in hand) each: whichever worker is ready first cannot take the whole
    # queue before the other has started, so both hold jobs.
    with workers(env, tmp_path, 2, "--batch-size", "4") as (victim, survivor):
        # Kill the victim in the middle of a job: once it holds real audio (seconds of work, where
        # a bad file fails in milliseconds) and has started on it.
        def victim_jobs():
            return [r.id for r in job_rows()
                    if r.status.value == "running" and r.duration_s and f":{victim.pid}" in (r.worker_host or "")]

        def victim_begun():
            return [r.id for r in job_rows() if r.id in victim_jobs() and r.attempts >= 1]

        wait_for(victim_begun, 120, "the first worker to begin a file")
        time.sleep(0.5)
        victim.kill()
        killed_at = time.monotonic()
        held = victim_jobs()  # the dead worker's rows can't change any more; its leases run out
        assert held, "the victim finished its jobs before the kill"
        # Begun (an attempt counted) or only waiting beside them (claimed, not yet begun).
        begun = {r.id: r.attempts for r in job_rows() if r.id in held and r.attempts >= 1}
        rows = wait_until_settled(300, [victim, survivor])
        recovered_after_s = time.monotonic() - killed_at

    by_path = {Path(r.path).name: r for r in rows}
    for clip in good:
        row = by_path[clip.name]
        assert row.status.value == "done", (clip.name, row.error)
        assert row.transcripts == 1
    for name, words in (
        ("corrupt.wav", "not an audio file"),
        ("notes.wav", "not an audio file"),
        ("timit.ogg", "file changed since it was queued"),  # emptied after enqueue
    ):
        row = by_path[name]
        assert row.status.value == "failed" and row.transcripts == 0
        assert row.error and "Traceback" not in row.error and name not in row.error  # the path stands beside it
        assert words in row.error
    assert begun, "the victim had begun no file"
    for job_id in held:  # what the victim held came back and was done by the survivor
        row = next(r for r in rows if r.id == job_id)
        assert row.status.value == "done" and f":{survivor.pid}" in row.worker_host
        # the kill costs an attempt only to the files the victim had begun, not to those waiting
        assert row.attempts == (begun[job_id] + 1 if job_id in begun else 1)
    assert "ask not what your country can do for you" in _transcript_text("jfk.flac").lower()
    print(f"recovered {len(held)} job(s) of the killed worker; all settled {recovered_after_s:.1f} s after the kill")


def test_flushed_broker_mid_run_is_reconciled(redis_url: str, shared_audio: Path, tmp_path: Path, monkeypatch):
    url = redis_url.rsplit("/", 1)[0] + "/10"
    clean_redis(url)
    env = worker_env(monkeypatch, tmp_path / "data", url)  # SQLite default
    clips = copy_clips(shared_audio, tmp_path / "audio", SHORT_CLIPS)
    first = enqueue(clips[:2])
    # Jobs that can't join the first batch (no word timestamps): their messages wait in the queue.
    waiting = enqueue(clips[2:], word_timestamps=False)
    assert len(first) == 2 and len(waiting) == 3
    # One row and no prefetch: the worker holds one job at a time, the others' messages wait.
    with workers(env, tmp_path, 1, "--batch-size", "1", "--prefetch", "0") as procs:
        wait_for(lambda: any(r.status.value == "running" for r in job_rows()), 120, "a job to start")
        redis.Redis.from_url(url).flushdb()  # the broker loses the waiting messages and their markers
        assert all(r.status.value == "queued" for r in job_rows() if r.id in waiting)
        rows = wait_until_settled(240, procs)
        log = procs[0].log()
    assert all(r.status.value == "done" and r.transcripts == 1 for r in rows), [(r.path, r.status, r.error) for r in rows]
    assert "re-dispatched" in log  # the worker's reconciler sent them again
