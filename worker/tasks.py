"""The transcription task: take a job id, check the world, do the work, write the result.

"Asserting the world is the responsibility of the task": a message only says "look at job N".
The task claims the job atomically in the database (queued -> running, or running with an expired
lease); a duplicate or redelivered message for a job that is done or held elsewhere claims nothing
and returns. While the engine runs, a thread renews the job's lease every lease_s / 3; if this
process dies, the lease runs out and the reconciler hands the job to another worker.

Cross-file batching: a worker that claims a short job also claims further queued short jobs of the
same model and options (up to BATCH_MAX_FILES files / BATCH_MAX_AUDIO_S seconds) and transcribes
them together; each still gets its own transcript, status and failure. Their own messages, still
in the queue, become no-ops when they arrive.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from celery import signals
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, OperationalError

from archive_asr.errors import DatabaseUnavailable, PermanentError, RetryableError
from archive_asr.settings import get_settings
from worker.app import TASK_NAME, app, queue_for_model

log = logging.getLogger(__name__)

SHORT_JOB_S = 60.0  # files up to this long are batched with others (a few 30 s windows at most)
BATCH_MAX_FILES = 16
BATCH_MAX_AUDIO_S = 300.0
DB_RETRY_DELAYS_S = (1, 2, 4, 8, 15, 30)  # backoff while the database does not answer, then give up
REQUEUE_BACKOFF_S = (5, 30, 120)  # countdown before a transient failure's next attempt, by attempt

T = TypeVar("T")


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    path: str  # the path to open (os.fsdecode of the stored bytes)
    display_path: str
    duration_s: float | None
    model: str
    language: str | None
    word_timestamps: bool
    attempts: int  # this claim included


def worker_identity(hostname: str | None) -> str:
    """Who holds a lease: the Celery node name plus the process id (unique even for prefork children)."""
    return f"{hostname or socket.gethostname()}:{os.getpid()}"


def _db_down(e: BaseException) -> bool:
    return isinstance(e, (DatabaseUnavailable, OperationalError)) or (
        isinstance(e, DBAPIError) and e.connection_invalidated
    )


def with_db_retry(what: str, fn: Callable[[], T]) -> T:
    """Run a database step, waiting out an unreachable or locked database with backoff (and saying so)."""
    for delay in (*DB_RETRY_DELAYS_S, None):
        try:
            return fn()
        except Exception as e:
            if not _db_down(e) or delay is None:
                raise
            log.warning("database unavailable while %s (%s); retrying in %s s", what, str(e).splitlines()[0], delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# --- claiming --------------------------------------------------------------------------------------


def _claim(session, job_id: int, holder: str, lease_s: float) -> ClaimedJob | None:
    from models.jobs import claim_job

    job = claim_job(session=session, job_id=job_id, worker_host=holder, lease_s=lease_s)
    if job is None:
        return None
    return ClaimedJob(
        job_id=job.id,
        path=job.fs_path,
        display_path=job.path,
        duration_s=job.duration_s,
        model=job.model,
        language=job.language,
        word_timestamps=job.word_timestamps,
        attempts=job.attempts,
    )


def claim_batch(job_ids: list[int], holder: str, lease_s: float) -> list[ClaimedJob]:
    """Claim the message's jobs, then (if they are short) more queued short jobs like them."""
    from models.db import session_scope
    from models.tables import Job, JobStatus

    claimed: list[ClaimedJob] = []
    with session_scope() as session:
        for job_id in job_ids:
            job = _claim(session, job_id, holder, lease_s)
            if job:
                claimed.append(job)
    if not claimed or not all(_is_short(j) for j in claimed):
        return claimed
    first = claimed[0]
    budget_s = BATCH_MAX_AUDIO_S - sum(j.duration_s or 0 for j in claimed)
    short_queued = [
        Job.status == JobStatus.QUEUED,
        Job.model == first.model,
        (Job.language == first.language) if first.language else Job.language.is_(None),
        Job.word_timestamps == first.word_timestamps,
        Job.duration_s.is_not(None),
        Job.duration_s <= min(SHORT_JOB_S, budget_s),
    ]
    with session_scope() as session:
        waiting = session.scalar(select(func.count()).select_from(Job).where(*short_queued)) or 0
    # Fair share: with k workers on this queue, take about 1/k of what waits, so a burst of short
    # files is spread over the fleet instead of landing on whichever worker woke first.
    share = -(-(waiting + len(claimed)) // live_workers(queue_for_model(first.model)))
    room = min(BATCH_MAX_FILES, share) - len(claimed)
    if room <= 0 or budget_s <= 0:
        return claimed
    with session_scope() as session:
        candidates = session.execute(
            select(Job.id, Job.duration_s)
            .where(*short_queued)
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(room * 2)
        ).all()
    for job_id, job_duration_s in candidates:
        if room <= 0:
            break
        if job_duration_s > budget_s:
            continue
        with session_scope() as session:  # one short transaction per claim: SQLite writers queue up
            job = _claim(session, job_id, holder, lease_s)
        if job:
            claimed.append(job)
            budget_s -= job_duration_s
            room -= 1
    return claimed


def _is_short(job: ClaimedJob) -> bool:
    return job.duration_s is not None and job.duration_s <= SHORT_JOB_S


# --- the lease -------------------------------------------------------------------------------------


class LeaseKeeper(threading.Thread):
    """Renews the leases of the jobs this task holds every lease_s / 3 until stopped."""

    def __init__(self, job_ids: list[int], holder: str, lease_s: float):
        super().__init__(name="lease-keeper", daemon=True)
        self.job_ids = list(job_ids)
        self.holder = holder
        self.lease_s = lease_s
        self.lost: set[int] = set()
        self._stop_event = threading.Event()

    def run(self) -> None:
        from models.db import session_scope
        from models.jobs import renew_lease

        while not self._stop_event.wait(self.lease_s / 3):
            try:
                with session_scope() as session:
                    for job_id in list(self.job_ids):  # the task releases finished jobs meanwhile
                        if job_id not in self.lost and not renew_lease(
                            session=session, job_id=job_id, worker_host=self.holder, lease_s=self.lease_s
                        ):
                            self.lost.add(job_id)
                            log.warning("job %s: lease lost (taken back by the reconciler)", job_id)
            except Exception as e:  # keep trying: the lease has lease_s of slack
                log.warning("could not renew leases of jobs %s: %s", self.job_ids, str(e).splitlines()[0])

    def release(self, job_id: int) -> None:
        if job_id in self.job_ids:
            self.job_ids.remove(job_id)

    def stop(self) -> None:
        self._stop_event.set()


# --- results ---------------------------------------------------------------------------------------


def _finish(job_id: int, transcript) -> bool:
    from models.db import session_scope
    from models.jobs import finish_job

    def write() -> bool:
        with session_scope() as session:
            return finish_job(session=session, job_id=job_id, transcript=transcript)

    return with_db_retry(f"saving job {job_id}", write)


def _fail(job_id: int, error: str, *, retryable: bool) -> str | None:
    from models.db import session_scope
    from models.jobs import fail_job

    def write():
        with session_scope() as session:
            return fail_job(session=session, job_id=job_id, error=error, retryable=retryable)

    status = with_db_retry(f"recording job {job_id}'s failure", write)
    return status.value if status is not None else None


def _transcribe(jobs: list[ClaimedJob], batch_size: int) -> Iterator[tuple[ClaimedJob, object]]:
    """Yield (job, Transcript or the exception it raised) for each job, batching short ones."""
    import engine  # noqa: F401  (OpenBLAS before MLX; loaded here, never at import)
    from engine import transcribe as engine_transcribe
    from engine.options import EngineOptions

    first = jobs[0]
    if len(jobs) > 1:
        # One bad file yields its error in its own slot; the others are transcribed together.
        options = EngineOptions(language=first.language, word_timestamps=first.word_timestamps, batch_size=batch_size)
        try:
            results = engine_transcribe.transcribe_many(
                [j.path for j in jobs], model_name=first.model, options=options, return_exceptions=True
            )
        except PermanentError:
            results = None  # e.g. a file that decodes but can't be prepared: isolate it below
        if results is not None:
            yield from zip(jobs, results)
            return
    for job in jobs:
        options = EngineOptions(language=job.language, word_timestamps=job.word_timestamps, batch_size=batch_size)
        try:
            yield job, engine_transcribe.transcribe_file(job.path, model_name=job.model, options=options)
        except Exception as e:  # recorded on the job by the caller, by kind
            yield job, e


def _release_memory() -> None:
    """Hand MLX's cached buffers back between tasks (a long file's peak shouldn't stay reserved)."""
    try:
        from engine.transcribe import clear_cache

        clear_cache()
    except Exception as e:  # never fail a finished task over cache housekeeping
        log.debug("could not clear the MLX cache: %s", e)


def _reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if isinstance(e, PermanentError) else f"{type(e).__name__}: {text}"


# --- the task --------------------------------------------------------------------------------------


@app.task(bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def transcribe(self, job_ids: list[int], path: str = "", duration_s: float | None = None, model: str = "") -> dict:
    """Transcribe the job(s) in this message; path/duration_s/model are only for Flower."""
    from worker.dispatch import dispatch_jobs, forget

    settings = get_settings()
    holder = worker_identity(self.request.hostname)
    started = time.monotonic()
    # The message is in our hands now: drop its markers, so that if this process dies the
    # reconciler re-dispatches the job once its lease runs out (see worker.reconcile).
    try:
        forget(job_ids)
    except Exception as e:
        log.warning("could not clear dispatch markers of %s: %s", job_ids, e)

    try:
        claimed = with_db_retry("claiming", lambda: claim_batch(list(job_ids), holder, settings.lease_s))
    except Exception as e:
        if not _db_down(e):
            raise
        # Still queued, no marker: the reconciler sends it again once the database is back.
        log.error("gave up claiming jobs %s, database unavailable: %s", job_ids, str(e).splitlines()[0])
        return {"claimed": [], "skipped": list(job_ids), "reason": "database unavailable"}
    if not claimed:
        return {"claimed": [], "skipped": list(job_ids), "reason": "already done or held by another worker"}

    keeper = LeaseKeeper([j.job_id for j in claimed], holder, settings.lease_s)
    keeper.start()
    report: list[dict] = []
    timings = []
    requeue: list[int] = []
    try:
        for job, result in _transcribe(claimed, app.conf.get("archive_asr_batch_size", settings.batch_size)):
            if isinstance(result, BaseException):
                retryable = not isinstance(result, PermanentError)
                status = _fail(job.job_id, _reason(result), retryable=retryable)
                if status == "queued":
                    requeue.append(job.job_id)
                if not isinstance(result, (PermanentError, RetryableError)):
                    log.error("job %s (%s) failed", job.job_id, job.display_path, exc_info=result)
                report.append({"job_id": job.job_id, "path": job.display_path, "status": status, "error": _reason(result)})
            else:
                saved = _finish(job.job_id, result)
                t = result.timing
                timings.append(t)
                report.append({
                    "job_id": job.job_id,
                    "path": job.display_path,
                    "status": "done" if saved else "superseded",
                    "audio_s": round(t.audio_s, 2),
                    "wall_s": round(t.wall_s, 2),
                    "real_time_factor": round(t.real_time_factor, 1),
                })
            keeper.release(job.job_id)
    except BaseException as e:
        # Something beyond one file (the model would not load, out of memory): every job not yet
        # recorded goes back to the queue, or fails at the attempt cap, with the reason.
        done = {r["job_id"] for r in report}
        for job in claimed:
            if job.job_id not in done and _fail(job.job_id, _reason(e), retryable=not isinstance(e, PermanentError)) == "queued":
                requeue.append(job.job_id)
        raise
    finally:
        keeper.stop()
        _release_memory()
        if requeue:
            attempts = max(j.attempts for j in claimed if j.job_id in requeue)
            try:  # back off: 5 s after a first failure, then 30 s, then 2 minutes
                dispatch_jobs(requeue, countdown=REQUEUE_BACKOFF_S[min(attempts, len(REQUEUE_BACKOFF_S)) - 1])
            except RetryableError as e:  # the reconciler will send them once the broker is back
                log.warning("could not re-dispatch jobs %s: %s", requeue, e)

    wall_s = time.monotonic() - started
    audio_s = sum(t.audio_s for t in timings)
    return {
        "jobs": report,
        "files": len(claimed),
        "audio_s": round(audio_s, 2),
        "wall_s": round(wall_s, 2),
        "engine_s": round(sum(t.wall_s for t in timings), 2),  # wall_s less claiming, model loading, saving
        "real_time_factor": round(audio_s / wall_s, 1) if wall_s > 0 else 0.0,
        "batch_size": max((t.batch_size for t in timings), default=0),
        "device": timings[0].device if timings else None,
        "model": claimed[0].model,
        "worker": holder,
    }


# --- worker life cycle -----------------------------------------------------------------------------

PRESENCE_KEY = "archive-asr:workers:{queue}"  # sorted set: worker -> last sign of life (unix time)
PRESENCE_EVERY_S = 5.0


def live_workers(queue: str) -> int:
    """How many workers consume `queue` now (at least 1: the one asking)."""
    from worker.broker import client

    try:
        n = client().zcount(PRESENCE_KEY.format(queue=queue), time.time() - 3 * PRESENCE_EVERY_S, "+inf")
    except Exception:  # the broker blinked: claim as if alone, the batch cap still holds
        return 1
    return max(1, int(n))


class Presence(threading.Thread):
    """Tells the fleet this worker is alive and which queues it serves (for fair batch shares)."""

    def __init__(self, queues: list[str], name: str):
        super().__init__(name="presence", daemon=True)
        self.queues = queues
        self.member = name
        self._stop_event = threading.Event()

    def beat(self) -> None:
        from worker.broker import client

        r = client()
        now = time.time()
        with r.pipeline() as pipe:
            for queue in self.queues:
                key = PRESENCE_KEY.format(queue=queue)
                pipe.zadd(key, {self.member: now})
                pipe.zremrangebyscore(key, "-inf", now - 3 * PRESENCE_EVERY_S)
            pipe.execute()

    def run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception as e:
                log.debug("presence beat failed: %s", e)
            if self._stop_event.wait(PRESENCE_EVERY_S):
                break
        try:
            from worker.broker import client

            r = client()
            for queue in self.queues:
                r.zrem(PRESENCE_KEY.format(queue=queue), self.member)
        except Exception:
            pass

    def stop(self) -> None:
        self._stop_event.set()


_threads: list = []


@signals.worker_ready.connect
def _start_background(sender=None, **_kwargs) -> None:
    """Start the presence beat and (unless disabled) the periodic reconciler in this worker.

    Every worker runs the reconciler; a Redis lock lets one of the fleet act per interval.
    """
    try:
        queues = [q.name for q in sender.task_consumer.queues]
    except AttributeError:
        queues = [app.conf.task_default_queue]
    presence = Presence(queues, worker_identity(getattr(sender, "hostname", None)))
    presence.start()
    _threads.append(presence)
    if app.conf.get("archive_asr_reconcile", True):
        from worker.reconcile import ReconcileThread

        reconciler = ReconcileThread()
        reconciler.start()
        _threads.append(reconciler)


@signals.worker_shutdown.connect
def _stop_background(sender=None, **_kwargs) -> None:
    for thread in _threads:
        thread.stop()
    for thread in _threads:
        thread.join(timeout=2)
