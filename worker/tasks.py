"""The transcription task: one message, one job, one Flower task with its own outcome.

"Asserting the world is the responsibility of the task": a message only says "look at job N".
The task claims the job atomically in the database (queued -> running, or running with an expired
lease); a duplicate or redelivered message for a job that is done or held elsewhere claims nothing
and returns. It then checks that the file is still the content that was queued, submits it to
the process's engine session (worker.engine_host) and waits for that file alone, while the other
task threads of the worker keep the session's batch rows full. The job is written to the database
the moment its file finishes. A job's attempt is counted when work on its file begins, not while
it only waits beside others; a job on its second attempt or later is decoded alone, so a file that
kills its batch is found and fails by itself.

A job that fails ends its Celery task in FAILURE, with the reason (Flower shows it red).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from archive_asr.errors import PermanentError, RetryableError
from archive_asr.settings import get_settings
from worker import config, engine_host
from worker.app import TASK_NAME, app
from worker.saving import database_down

log = logging.getLogger(__name__)

DB_RETRY_DELAYS_S = (1, 2, 4, 8, 15, 30)  # backoff while the database does not answer, then give up

T = TypeVar("T")


class JobFailed(Exception):
    """Raised when a job's file could not be transcribed: ends the Celery task in FAILURE."""


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    path: str  # the path to open (os.fsdecode of the stored bytes)
    display_path: str
    model: str
    language: str | None
    word_timestamps: bool
    attempts: int  # attempts begun before this claim


def worker_identity(hostname: str | None) -> str:
    """Who holds a lease: the Celery node name (model, device, pid: "base-gpu1-1234@host") plus the pid."""
    return f"{hostname or socket.gethostname()}:{os.getpid()}"


def with_db_retry(what: str, fn: Callable[[], T]) -> T:
    """Run a database step, waiting out an unreachable or locked database with backoff (and saying so)."""
    for delay in (*DB_RETRY_DELAYS_S, None):
        try:
            return fn()
        except Exception as e:
            if not database_down(e) or delay is None:
                raise
            log.warning("database unavailable while %s (%s); retrying in %s s", what, str(e).splitlines()[0], delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def claim(job_id: int, holder: str, lease_s: float) -> tuple[ClaimedJob | None, str | None]:
    """(the claimed job or None, why its file can't be used or None)."""
    from models.db import session_scope
    from models.jobs import check_unchanged, claim_job

    with session_scope() as session:
        job = claim_job(session=session, job_id=job_id, worker_host=holder, lease_s=lease_s)
        if job is None:
            return None, None
        claimed = ClaimedJob(
            job_id=job.id,
            path=job.fs_path,
            display_path=job.path,
            model=job.model,
            language=job.language,
            word_timestamps=job.word_timestamps,
            attempts=job.attempts,
        )
        return claimed, check_unchanged(job=job)


def _start_attempt(job_id: int, holder: str) -> None:
    from models.db import session_scope
    from models.jobs import start_attempt

    def write():
        with session_scope() as session:
            return start_attempt(session=session, job_id=job_id, worker_host=holder)

    with_db_retry(f"starting job {job_id}", write)


def _fail(job_id: int, error: str, *, retryable: bool) -> str | None:
    from models.db import session_scope
    from models.jobs import fail_job

    def write():
        with session_scope() as session:
            return fail_job(session=session, job_id=job_id, error=error, retryable=retryable)

    status = with_db_retry(f"recording job {job_id}'s failure", write)
    return status.value if status is not None else None


def _reason(e: BaseException, path: str) -> str:
    """One line for jobs.error; the job's path is shown beside it, so it is not repeated here."""
    text = str(e).strip() or type(e).__name__
    text = text.removeprefix(f"{path}: ")
    return text if isinstance(e, (PermanentError, RetryableError)) else f"{type(e).__name__}: {text}"


def _requeue(job_id: int, attempts: int) -> None:
    from worker.dispatch import dispatch_jobs

    backoff = config.REQUEUE_BACKOFF_S
    try:  # back off: 5 s after a first failure, then 30 s, then 2 minutes
        dispatch_jobs([job_id], countdown=backoff[min(max(attempts, 1), len(backoff)) - 1])
    except RetryableError as e:  # the reconciler will send it once the broker is back
        log.warning("could not re-dispatch job %s: %s", job_id, e)


def _engine_options(job: ClaimedJob):
    from engine.options import EngineOptions

    return EngineOptions(language=job.language, word_timestamps=job.word_timestamps)


@app.task(bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def transcribe(
    self, job_ids: list[int], file: str = "", duration_s: float | None = None, path: str = "", model: str = ""
) -> dict:
    """Transcribe the job in this message; file/duration_s/path/model are only there for Flower."""
    from worker.dispatch import forget

    settings = get_settings()
    holder = worker_identity(self.request.hostname)
    started = time.monotonic()
    # The message is in our hands now: drop its marker, so that if this process dies the
    # reconciler re-dispatches the job once its lease runs out (see worker.reconcile).
    try:
        forget(job_ids)
    except Exception as e:
        log.warning("could not clear dispatch markers of %s: %s", job_ids, e)
    reports = [_run_job(job_id, holder, settings.lease_s) for job_id in job_ids]
    failed = [r for r in reports if r.get("status") in ("failed", "queued")]
    if failed:
        raise JobFailed("; ".join(f"{r['file']}: {r['error']} (job {r['job_id']} {r['status']})" for r in failed))
    report = reports[0] if len(reports) == 1 else {"jobs": reports}
    report["wall_s"] = round(time.monotonic() - started, 2)
    return report


def _run_job(job_id: int, holder: str, lease_s: float) -> dict:
    """Claim, check, transcribe and save one job; a short report with its summary first."""
    t0 = time.perf_counter()
    try:
        job, problem = with_db_retry("claiming", lambda: claim(job_id, holder, lease_s))
    except Exception as e:
        if not database_down(e):
            raise
        # Still queued, no marker: the reconciler sends it again once the database is back.
        log.error("gave up claiming job %s, database unavailable: %s", job_id, str(e).splitlines()[0])
        return {"job_id": job_id, "status": "skipped", "reason": "database unavailable"}
    finally:
        engine_host.count_db(time.perf_counter() - t0)
    if job is None:
        return {"job_id": job_id, "status": "skipped", "reason": "already done or held by another worker"}
    if problem is not None:
        status = _fail(job.job_id, problem, retryable=False)
        return {"file": job.display_path, "status": status or "failed", "error": problem, "job_id": job.job_id}

    keeper = engine_host.lease_keeper(holder, lease_s)
    keeper.hold(job.job_id)
    try:
        session = engine_host.session(job.model, config.current().batch_size)
        future = session.submit(
            job.path,
            options=_engine_options(job),
            key=job.job_id,
            solo=job.attempts >= 1,
            on_start=lambda: _start_attempt(job.job_id, holder),
        )
        error = None
        try:
            transcript = future.result()
        except Exception as e:
            error = e
        finally:
            # the file is done: recording its outcome ends the lease, and a renewal racing that
            # write would read as "lease lost"
            keeper.release(job.job_id)
        return _record_failure(job, error) if error is not None else _save(job, holder, transcript)
    except Exception as e:  # the model would not load, the database went away: the job's own failure
        return _record_failure(job, e)
    finally:
        keeper.release(job.job_id)


def _record_failure(job: ClaimedJob, e: BaseException) -> dict:
    retryable = not isinstance(e, PermanentError)
    reason = _reason(e, job.path)
    status = _fail(job.job_id, reason, retryable=retryable)
    if not isinstance(e, (PermanentError, RetryableError)):
        log.error("job %s failed", job.job_id, exc_info=e)
    else:
        log.warning("job %s failed: %s", job.job_id, reason)
    if status == "queued":
        _requeue(job.job_id, job.attempts + 1)
    return {"file": job.display_path, "status": status or "failed", "error": reason, "job_id": job.job_id}


def _save(job: ClaimedJob, holder: str, transcript) -> dict:
    from worker.saving import save_transcript

    t0 = time.perf_counter()
    saved = save_transcript(job_id=job.job_id, holder=holder, transcript=transcript)
    engine_host.count_db(time.perf_counter() - t0)
    t = transcript.timing
    return {
        "file": job.display_path,
        "status": "done" if saved else "superseded",
        "audio_s": round(t.audio_s, 2),
        "x_real_time": round(t.real_time_factor, 1),
        "words": sum(len(s.words) for s in transcript.segments),
        "language": transcript.language,
        "warnings": list(transcript.warnings),
        "job_id": job.job_id,
        "device": t.device,
        "batch_size": t.batch_size,
    }
