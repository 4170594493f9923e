"""The reconciler: the database says what must happen, the broker is made to agree.

Two kinds of work get lost, and one pass finds both:

1. **Expired leases.** A running job whose lease ran out (its worker was killed, unplugged, or lost
   the database) goes back to queued through models.jobs.release_expired, which counts it as an
   attempt (a file that kills its worker every time fails at the cap instead of looping), and is
   dispatched again.
2. **Lost messages.** Every message has a marker in the broker (worker.dispatch) that the task
   deletes on receipt. A queued job with no marker has no message: the broker restarted empty or
   was flushed, the task gave up on an unreachable database, or the job was just released. Those
   are dispatched again. A job whose message merely waits in a long queue keeps its marker and is
   left alone, so the broker is never flooded with duplicates. The one case a marker can outlive
   its message (a process dying between writing the marker and the message, or holding a
   delayed retry) is caught when the model's queue is empty yet the job is still queued.

Jobs younger than a grace period are skipped, so a dispatch in progress is not duplicated. Any
duplicate that slips through is harmless: the task's atomic claim makes it a no-op.

Runs as `archive-asr reconcile`, as a thread in every worker and in `archive-asr run`; a Redis lock
lets one process in the fleet act per interval.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import redis
from sqlalchemy import select

from archive_asr.errors import ArchiveAsrError
from archive_asr.settings import get_settings
from worker.app import PRIORITY_STEPS, queue_for_model
from worker.dispatch import MARKERS_KEY, dispatch_jobs
from worker.config import REQUEUE_BACKOFF_S

log = logging.getLogger(__name__)

LOCK_KEY = "archive-asr:reconcile-lock"
LOST_LOCK_KEY = "archive-asr:reconcile-lost-lock"
KOMBU_PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport names a priority list "<queue>\x06\x16<step>"


@dataclass
class ReconcileReport:
    released: list[int] = field(default_factory=list)  # expired leases taken back to queued
    failed: list[int] = field(default_factory=list)  # expired leases at the attempt cap
    redispatched: list[int] = field(default_factory=list)  # queued jobs whose message was gone
    skipped: bool = False  # another process holds the reconcile lock

    def as_dict(self) -> dict:
        return asdict(self)

    def __bool__(self) -> bool:
        return bool(self.released or self.failed or self.redispatched)


def interval_s() -> float:
    """How often the periodic reconciler looks for expired leases: a third of a lease, at most 5 s,
    so a dead worker's job is back within about lease_s + 5 s of its last renewal."""
    return max(1.0, min(5.0, get_settings().lease_s / 3))


def lost_check_every_s() -> float:
    """Looking for lost messages reads every queued job id: do it less often than the lease check."""
    return 3 * interval_s()


def grace_s() -> float:
    return max(5.0, 2 * interval_s())


def queue_length(r: redis.Redis, queue: str) -> int:
    with r.pipeline() as pipe:
        for step in PRIORITY_STEPS:
            pipe.llen(queue if step == 0 else f"{queue}{KOMBU_PRIORITY_SEP}{step}")
        return sum(pipe.execute())


def _acquire(r: redis.Redis, hold_s: float, key: str = LOCK_KEY) -> bool:
    return bool(r.set(key, uuid.uuid4().hex, nx=True, px=int(hold_s * 1000)))


def reconcile(*, force: bool = False, grace: float | None = None) -> ReconcileReport:
    """One pass: release expired leases, re-dispatch queued jobs whose message is gone."""
    from models.db import session_scope
    from models.jobs import expired_jobs, release_expired
    from models.base import utcnow
    from models.tables import Job, JobStatus
    from worker.broker import client

    report = ReconcileReport()
    r = client()
    # Held for one interval and not released: at most one pass per interval across the fleet.
    if not _acquire(r, interval_s() * 0.9) and not force:
        report.skipped = True
        return report
    grace = grace_s() if grace is None else grace

    with session_scope() as session:
        for job in expired_jobs(session=session):
            status = release_expired(session=session, job_id=job.id)
            if status == JobStatus.QUEUED:
                report.released.append(job.id)
            elif status == JobStatus.FAILED:
                report.failed.append(job.id)

    if report.released:
        # Straight back on the queue, unless a message for the job still waits there (a short job
        # claimed along with another keeps its own message until a worker takes it).
        marked = r.hmget(MARKERS_KEY, [str(i) for i in report.released])
        report.redispatched = [i for i, m in zip(report.released, marked) if m is None]
        if report.redispatched:
            dispatch_jobs(report.redispatched)
    if not _acquire(r, lost_check_every_s() * 0.9, LOST_LOCK_KEY) and not force:
        _log(report)
        return report
    cutoff = utcnow() - timedelta(seconds=grace)
    # The markers first, then the queued jobs: a task drops its marker and then claims its job, so
    # read the other way round, a job claimed between the two reads looked queued without a
    # marker and was sent again (a pass in every fleet drill's phase re-dispatched 1 or 2 of them;
    # harmless, the claim is atomic, but a duplicate message and a warning each time).
    markers = {int(k): v.decode() for k, v in r.hgetall(MARKERS_KEY).items()}
    with session_scope() as session:
        queued = session.execute(
            select(Job.id, Job.model, Job.created_at, Job.dispatched_at).where(Job.status == JobStatus.QUEUED)
        ).all()
    candidates = [
        row for row in queued
        if row.created_at < cutoff and (row.dispatched_at is None or row.dispatched_at < cutoff)
    ]
    if candidates:
        empty_queues: dict[str, bool] = {}
        # A marker older than this with an empty queue has outlived its message (see module doc).
        stale_before = time.time() - grace - max(REQUEUE_BACKOFF_S)
        lost = []
        for row in candidates:
            if row.id in report.redispatched:
                continue
            marker = markers.get(row.id)
            if marker is None:
                lost.append(row.id)
                continue
            queue = queue_for_model(row.model)
            if queue not in empty_queues:
                empty_queues[queue] = queue_length(r, queue) == 0
            if empty_queues[queue] and float(marker.rsplit(" ", 1)[-1]) < stale_before:
                lost.append(row.id)
        if lost:
            dispatch_jobs(lost)
            report.redispatched += lost
    _log(report)
    return report


def _log(report: ReconcileReport) -> None:
    if report:
        log.warning(
            "reconciler: %d expired lease(s) re-queued, %d failed at the attempt cap, %d job(s) re-dispatched",
            len(report.released), len(report.failed), len(report.redispatched),
        )


class ReconcileThread(threading.Thread):
    """Runs reconcile() every interval_s() until stopped; errors are logged and retried next time."""

    def __init__(self, every_s: float | None = None):
        super().__init__(name="reconciler", daemon=True)
        self.every_s = every_s or interval_s()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            try:
                reconcile()
            except (ArchiveAsrError, redis.RedisError) as e:
                log.warning("reconciler: %s", e)
            except Exception:
                log.exception("reconciler pass failed")

    def stop(self) -> None:
        self._stop_event.set()
