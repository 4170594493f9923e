"""A job that failed on a missing file goes back to the queue when `enqueue` finds its content again."""

from __future__ import annotations

import shutil
from pathlib import Path

from models.db import session_scope
from models.jobs import claim_job, fail_job
from models.tables import Job, JobStatus
from scheduler.enqueue import Enqueuer, job_spec
from tests.fixtures_worker import copy_clips

SPEC = job_spec(model="tiny.en", language=None, word_timestamps=True, priority=0)


def _fail(job_id: int, error: str) -> None:
    with session_scope() as s:
        assert claim_job(session=s, job_id=job_id, worker_host="test", lease_s=20)
        assert fail_job(session=s, job_id=job_id, error=error, retryable=False) == JobStatus.FAILED


def test_a_file_that_moved_after_its_job_failed_is_requeued(data_dir: Path, tmp_path: Path, shared_audio: Path):
    moved, broken = copy_clips(shared_audio, tmp_path / "old", ("jfk.flac", "timit_LDC93S1.wav"))
    first = Enqueuer(spec=SPEC).run([str(tmp_path / "old")])
    assert len(first.new_jobs) == 2
    by_path = {}
    with session_scope() as s:
        for job_id in first.new_jobs:
            by_path[s.get(Job, job_id).path] = job_id
    moved_id, broken_id = by_path[str(moved)], by_path[str(broken)]

    (tmp_path / "new").mkdir()
    shutil.move(moved, tmp_path / "new" / moved.name)  # moved away while its job waited
    _fail(moved_id, f"{moved}: no such file")  # the worker's words (engine.audio)
    _fail(broken_id, f"{broken}: not an audio file")  # a failure that a new scan does not cure
    shutil.move(broken, tmp_path / "new" / broken.name)

    again = Enqueuer(spec=SPEC).run([str(tmp_path / "new")])
    assert again.requeued == 1 and again.new_jobs == [moved_id]  # dispatched with the new jobs
    assert again.to_json(dry_run=False)["requeued"] == 1
    with session_scope() as s:
        job = s.get(Job, moved_id)
        assert job.status == JobStatus.QUEUED and job.path == str(tmp_path / "new" / moved.name)
        assert job.attempts == 0 and job.error is None
        other = s.get(Job, broken_id)
        assert other.status == JobStatus.FAILED and "not an audio file" in other.error

    assert Enqueuer(spec=SPEC).run([str(tmp_path / "new")]).requeued == 0  # once
