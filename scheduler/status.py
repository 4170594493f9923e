"""What `archive-asr status` reports: counts, hours done and left, throughput, ETA, failures, workers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import timedelta

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from models.base import utcnow
from models.tables import Job, JobStatus, Transcript

WINDOW_S = 3600  # throughput is measured over the last hour
MAX_FAILURES = 50


@dataclass(frozen=True)
class WorkerRow:
    host: str
    running: int
    done_last_hour: int
    audio_s_last_hour: float
    mean_real_time_factor: float | None
    last_heartbeat: str | None


@dataclass(frozen=True)
class Failure:
    job_id: int
    path: str
    attempts: int
    error: str | None


@dataclass
class Report:
    counts: dict[str, int]
    audio_s_done: float
    audio_s_left: float
    jobs_left_without_duration: int
    done_last_hour: int
    audio_s_last_hour: float
    eta_s: float | None
    failures: list[Failure] = field(default_factory=list)
    failed_total: int = 0
    workers: list[WorkerRow] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        d["hours_done"] = round(self.audio_s_done / 3600, 4)
        d["hours_left"] = round(self.audio_s_left / 3600, 4)
        d["audio_hours_per_hour"] = round(self.audio_s_last_hour / WINDOW_S, 4)
        return d


def _count_if(condition):
    return func.sum(case((condition, 1), else_=0))


def build_report(*, session: Session) -> Report:
    now = utcnow()
    since = now - timedelta(seconds=WINDOW_S)
    counts = {s.value: 0 for s in JobStatus}
    audio: dict[str, float] = {}
    unknown_left = 0
    for status, n, seconds, unknown in session.execute(
        select(
            Job.status,
            func.count(),
            func.coalesce(func.sum(Job.duration_s), 0.0),
            _count_if(Job.duration_s.is_(None)),
        ).group_by(Job.status)
    ):
        status = JobStatus(status)
        counts[status.value] = n
        audio[status.value] = float(seconds)
        if status in (JobStatus.QUEUED, JobStatus.RUNNING):
            unknown_left += int(unknown or 0)
    # Finished work is measured by what the engine decoded, the header's estimate otherwise.
    done_s = session.scalar(
        select(func.coalesce(func.sum(func.coalesce(Transcript.duration_s, Job.duration_s)), 0.0))
        .select_from(Job).join(Transcript, Transcript.job_id == Job.id, isouter=True)
        .where(Job.status == JobStatus.DONE)
    )
    done_last_hour, audio_last_hour = session.execute(
        select(func.count(), func.coalesce(func.sum(func.coalesce(Transcript.duration_s, Job.duration_s)), 0.0))
        .select_from(Job).join(Transcript, Transcript.job_id == Job.id, isouter=True)
        .where(Job.status == JobStatus.DONE, Job.finished_at >= since)
    ).one()
    left_s = audio.get("queued", 0.0) + audio.get("running", 0.0)
    eta_s = left_s / (audio_last_hour / WINDOW_S) if audio_last_hour > 0 and left_s > 0 else None

    failures = [
        Failure(job_id=j.id, path=j.path, attempts=j.attempts, error=j.error)
        for j in session.scalars(
            select(Job).where(Job.status == JobStatus.FAILED).order_by(Job.finished_at.desc(), Job.id).limit(MAX_FAILURES)
        )
    ]

    workers = []
    recent = (Job.status == JobStatus.DONE) & (Job.finished_at >= since)
    rows = session.execute(
        select(
            Job.worker_host,
            _count_if(Job.status == JobStatus.RUNNING),
            _count_if(recent),
            func.coalesce(func.sum(case((recent, func.coalesce(Transcript.duration_s, Job.duration_s)), else_=0.0)), 0.0),
            func.avg(Transcript.real_time_factor),
            func.max(Job.heartbeat_at),
        )
        .select_from(Job).join(Transcript, Transcript.job_id == Job.id, isouter=True)
        .where(Job.worker_host.is_not(None), or_(Job.status == JobStatus.RUNNING, Job.finished_at >= since))
        .group_by(Job.worker_host)
        .order_by(Job.worker_host)
    )
    for host, running, done, seconds, rtf, heartbeat in rows:
        if isinstance(heartbeat, str):  # SQLite returns max() of a timestamp as text
            heartbeat_text = heartbeat
        else:
            heartbeat_text = heartbeat.isoformat() if heartbeat else None
        workers.append(WorkerRow(host=host, running=int(running or 0), done_last_hour=int(done or 0),
                                 audio_s_last_hour=float(seconds or 0.0),
                                 mean_real_time_factor=float(rtf) if rtf is not None else None,
                                 last_heartbeat=heartbeat_text))
    return Report(
        counts=counts,
        audio_s_done=float(done_s or 0.0),
        audio_s_left=left_s,
        jobs_left_without_duration=unknown_left,
        done_last_hour=int(done_last_hour),
        audio_s_last_hour=float(audio_last_hour),
        eta_s=eta_s,
        failures=failures,
        failed_total=counts["failed"],
        workers=workers,
    )
