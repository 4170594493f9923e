"""The job-state API: every status change goes through `transition`, in the caller's transaction.

Workers call claim_job / renew_lease / finish_job / fail_job; the reconciler calls expired_jobs,
release_expired and queued_jobs; the CLI calls retry_job. Each helper takes keyword arguments
and a session; `models.db.session_scope()` commits.
"""

from __future__ import annotations

import hashlib
import os
import stat
from datetime import datetime, timedelta

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.orm import Session

from archive_asr import records
from archive_asr.settings import get_settings
from models.base import utcnow
from models.tables import Job, JobStatus, Segment, Transcript, Word

MAX_ERROR_CHARS = 4000
MTIME_TOLERANCE_S = 1e-6  # jobs.mtime is float seconds: nanoseconds do not survive the round trip

# Which status may follow which. running -> running is a reclaim after the lease expired;
# queued -> done is a worker that finished after its lease was taken back (the work is good).
ALLOWED: dict[JobStatus, set[JobStatus]] = {
    JobStatus.QUEUED: {JobStatus.RUNNING, JobStatus.DONE, JobStatus.FAILED},
    JobStatus.RUNNING: {JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.DONE, JobStatus.FAILED},
    JobStatus.FAILED: {JobStatus.QUEUED},
    JobStatus.DONE: {JobStatus.QUEUED},
}


def transition(*, session: Session, job_id: int, to: JobStatus, from_: set[JobStatus], where=(), **values) -> bool:
    """Move one job to `to` if its status is in `from_` (and `where` holds), in one UPDATE.

    The WHERE on the current status is what makes a claim atomic: of two workers racing for a
    job, one UPDATE matches a row and the other matches none. Returns whether the job moved.
    """
    bad = [s for s in from_ if to not in ALLOWED[s]]
    if bad:
        raise ValueError(f"no transition from {bad[0].value} to {to.value}")
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_(list(from_)), *where)
        .values(status=to, **values)
        .execution_options(synchronize_session=False)
    )
    moved = session.execute(stmt).rowcount == 1
    if moved:
        session.get(Job, job_id, populate_existing=True)  # keep the session's copy in step with the row
    return moved


def claim_job(*, session: Session, job_id: int, worker_host: str, lease_s: float) -> Job | None:
    """queued -> running for this worker (or take over a running job whose lease expired).

    Returns the job, or None when another worker holds it or it is done/failed/gone.
    """
    now = utcnow()
    moved = transition(
        session=session,
        job_id=job_id,
        to=JobStatus.RUNNING,
        from_={JobStatus.QUEUED, JobStatus.RUNNING},
        where=(or_(Job.status == JobStatus.QUEUED, Job.lease_expires_at < now),),
        worker_host=worker_host,
        lease_expires_at=now + timedelta(seconds=lease_s),
        heartbeat_at=now,
        started_at=now,
        finished_at=None,
    )
    return session.get(Job, job_id) if moved else None


def start_attempt(*, session: Session, job_id: int, worker_host: str) -> bool:
    """Count an attempt when work on a claimed job's file begins (not at the claim: a job that only
    waited beside a file that killed its worker has not been tried). False: not ours any more."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.worker_host == worker_host)
        .values(attempts=Job.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount == 1


def renew_lease(*, session: Session, job_id: int, worker_host: str, lease_s: float) -> bool:
    """Extend a running job's lease; False when this worker no longer holds it."""
    now = utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.worker_host == worker_host)
        .values(lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount == 1


def finish_job(*, session: Session, job_id: int, transcript: records.Transcript) -> bool:
    """Write the transcript, its segments and words, and mark the job done, in the caller's transaction.

    An earlier attempt's rows for this job are replaced. Returns False (writing nothing) when the
    job is not running or queued any more, e.g. another worker already finished it.
    """
    if not transition(
        session=session,
        job_id=job_id,
        to=JobStatus.DONE,
        from_={JobStatus.RUNNING, JobStatus.QUEUED},
        finished_at=utcnow(),
        lease_expires_at=None,
        error=None,
    ):
        return False
    _write_transcript(session=session, job_id=job_id, transcript=transcript)
    return True


def _write_transcript(*, session: Session, job_id: int, transcript: records.Transcript) -> None:
    old = session.scalars(select(Transcript.id).where(Transcript.job_id == job_id)).all()
    if old:
        # Children first: SQLite enforces ON DELETE CASCADE only with foreign_keys on; be explicit.
        seg_ids = select(Segment.id).where(Segment.transcript_id.in_(old))
        session.execute(delete(Word).where(Word.segment_id.in_(seg_ids)))
        session.execute(delete(Segment).where(Segment.transcript_id.in_(old)))
        session.execute(delete(Transcript).where(Transcript.id.in_(old)))
    timing = transcript.timing
    transcript_id = session.scalar(
        insert(Transcript)
        .values(
            job_id=job_id,
            language=transcript.language,
            language_probability=transcript.language_probability,
            text=transcript.text,
            duration_s=transcript.duration_s,
            model=timing.model,
            options=dict(transcript.options),
            wall_s=timing.wall_s,
            real_time_factor=timing.real_time_factor,
            device=timing.device,
            batch_size=timing.batch_size,
            created_at=utcnow(),
            decoded_s=transcript.decoded_s,
            warnings="\n".join(" ".join(w.split()) for w in transcript.warnings) or None,  # one line each
        )
        .returning(Transcript.id)
    )
    if not transcript.segments:
        return
    segment_rows = [
        dict(
            transcript_id=transcript_id,
            index=i,
            start_s=s.start_s,
            end_s=s.end_s,
            text=s.text,
            avg_logprob=s.avg_logprob,
            no_speech_prob=s.no_speech_prob,
            compression_ratio=s.compression_ratio,
            temperature=s.temperature,
        )
        for i, s in enumerate(transcript.segments)
    ]
    segment_ids = session.scalars(
        insert(Segment).returning(Segment.id, sort_by_parameter_order=True), segment_rows
    ).all()
    word_rows = [
        dict(segment_id=seg_id, index=j, start_s=w.start_s, end_s=w.end_s, word=w.word, probability=w.probability)
        for seg_id, s in zip(segment_ids, transcript.segments)
        for j, w in enumerate(s.words)
    ]
    if word_rows:
        _insert_words(session=session, rows=word_rows)


WORD_COLUMNS = ("segment_id", "index", "start_s", "end_s", "word", "probability")


def _insert_words(*, session: Session, rows: list[dict]) -> None:
    """PostgreSQL (psycopg 3): COPY; elsewhere, an executemany.

    A 5-minute transcript has ~800 words. Through executemany PostgreSQL took ~70 ms and 31 ms of
    CPU for them, through COPY ~23 ms and 4 ms (this 2-core box, median of 8). The CPU matters: a
    worker's task threads save transcripts while its driver thread runs the device, and both hold
    the same GIL."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql" or bind.dialect.driver != "psycopg":
        session.execute(insert(Word), rows)
        return
    columns = ", ".join(f'"{c}"' for c in WORD_COLUMNS)
    raw = session.connection().connection.driver_connection  # the session's own transaction
    with raw.cursor() as cursor, cursor.copy(f"COPY {Word.__tablename__} ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(tuple(row[c] for c in WORD_COLUMNS))


def fail_job(*, session: Session, job_id: int, error: str, retryable: bool) -> JobStatus | None:
    """Record a failure: a retryable one under the attempt cap goes back to queued, else failed.

    Returns the status the job moved to, or None when it was not running/queued.
    """
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return None
    error = error[:MAX_ERROR_CHARS]
    if retryable and job.attempts < get_settings().max_attempts:
        to = JobStatus.QUEUED
        extra = dict(finished_at=None, dispatched_at=None)
    else:
        to = JobStatus.FAILED
        extra = dict(finished_at=utcnow())
        if retryable:
            error = f"gave up after {job.attempts} attempts: {error}"
    moved = transition(
        session=session,
        job_id=job_id,
        to=to,
        from_={JobStatus.RUNNING} if to == JobStatus.QUEUED else {JobStatus.RUNNING, JobStatus.QUEUED},
        error=error,
        lease_expires_at=None,
        **extra,
    )
    return to if moved else None


FILE_CHANGED = "file changed since it was queued"
FILE_GONE = "file is gone since it was queued (moved or deleted; enqueue its new place)"
HASH_BLOCK = 1 << 20  # 1 MiB reads, as enqueue hashes


def _sha256(path_bytes: bytes) -> str:
    digest = hashlib.sha256()
    with open(path_bytes, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check_unchanged(*, job: Job) -> str | None:
    """None when the file at the job's path still holds the content that was queued, else why not.

    The worker calls it right after claiming a job, before decoding, and fails the job with the
    reason (a permanent failure: `archive-asr enqueue` of the file makes the job for its new
    content). Size and modification time as queued: unchanged, nothing read. Another size: changed.
    Same size, another time (touched, copied back): the sha256 decides.
    """
    try:
        st = os.stat(job.path_bytes)
    except FileNotFoundError:
        return FILE_GONE
    except OSError as e:
        return f"file cannot be read since it was queued ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return FILE_GONE
    if st.st_size != job.size:
        return FILE_CHANGED
    if abs(st.st_mtime_ns / 1e9 - job.mtime) < MTIME_TOLERANCE_S:
        return None
    try:
        same = _sha256(job.path_bytes) == job.sha256
    except OSError as e:
        return f"file cannot be read since it was queued ({e.strerror or e})"
    return None if same else FILE_CHANGED


def expired_jobs(*, session: Session, now: datetime | None = None, limit: int | None = None) -> list[Job]:
    """Running jobs whose lease ran out: their worker died or lost the database."""
    stmt = (
        select(Job)
        .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < (now or utcnow()))
        .order_by(Job.lease_expires_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def release_expired(*, session: Session, job_id: int) -> JobStatus | None:
    """Take back a running job whose lease expired: queued again, or failed at the attempt cap."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != JobStatus.RUNNING or job.lease_expires_at is None:
        return None
    if job.lease_expires_at >= utcnow():
        return None
    host = job.worker_host or "unknown host"
    return fail_job(
        session=session, job_id=job_id, error=f"worker on {host} stopped renewing its lease", retryable=True
    )


def queued_jobs(
    *, session: Session, dispatched_before: datetime | None = None, limit: int | None = None
) -> list[Job]:
    """Queued jobs, highest priority first, then oldest.

    With `dispatched_before`, only those never dispatched or dispatched before that time (a task
    the broker lost).
    """
    stmt = select(Job).where(Job.status == JobStatus.QUEUED)
    if dispatched_before is not None:
        stmt = stmt.where(or_(Job.dispatched_at.is_(None), Job.dispatched_at < dispatched_before))
    stmt = stmt.order_by(Job.priority.desc(), Job.created_at, Job.id).limit(limit)
    return list(session.scalars(stmt))


def mark_dispatched(*, session: Session, job_ids: list[int]) -> None:
    """Record that tasks for these jobs were sent to the broker."""
    if job_ids:
        session.execute(
            update(Job).where(Job.id.in_(job_ids)).values(dispatched_at=utcnow()).execution_options(synchronize_session=False)
        )


def retry_job(*, session: Session, job_id: int) -> bool:
    """failed -> queued with a fresh attempt count (the user's `archive-asr retry`)."""
    return transition(
        session=session,
        job_id=job_id,
        to=JobStatus.QUEUED,
        from_={JobStatus.FAILED},
        attempts=0,
        error=None,
        worker_host=None,
        finished_at=None,
        dispatched_at=None,
        lease_expires_at=None,
    )
