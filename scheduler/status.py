"""What `archive-asr status` reports: counts, hours done and left, throughput, ETA, failures, workers.

Throughput is audio finished in the last hour divided by the time actually worked on it: the union
of the finished jobs' [started_at, finished_at] intervals, so a queue that started two minutes ago
is measured over those two minutes (not over an hour), and neither idle gaps nor two workers busy at
once are counted twice. The ETA is the audio left at that rate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from models.base import utcnow
from models.search import current_transcripts
from models.tables import Job, JobStatus, Transcript

WINDOW_S = 3600  # throughput is measured over the last hour
MAX_FAILURES = 50
MAX_PARTIALS = 50


@dataclass(frozen=True)
class WorkerRow:
    host: str
    device: str | None  # what it computes on, e.g. "cpu", "gpu:1 (NVIDIA H100 80GB HBM3)" (see worker_device)
    running: int
    done_last_hour: int
    audio_s_last_hour: float
    worked_s_last_hour: float  # time spent on the jobs it finished in the last hour
    audio_hours_per_hour: float | None  # audio_s_last_hour / worked_s_last_hour; None before a job finishes
    mean_real_time_factor: float | None  # the engine's audio seconds per wall second, mean over its jobs
    last_heartbeat: str | None


@dataclass(frozen=True)
class Failure:
    job_id: int
    path: str
    attempts: int
    error: str | None


@dataclass(frozen=True)
class Partial:
    """A finished transcript of less than the whole recording (or with a gap): what the decoder said."""

    job_id: int
    path: str
    decoded_s: float | None  # seconds decoded (silence standing in for damage included)
    stated_s: float | None  # the header's duration, read at enqueue
    warnings: list[str]


@dataclass
class Report:
    counts: dict[str, int]
    audio_s_done: float
    audio_s_left: float
    jobs_left_without_duration: int
    done_last_hour: int
    audio_s_last_hour: float
    worked_s_last_hour: float  # union of the intervals the jobs finished in the last hour ran in
    audio_hours_per_hour: float | None  # audio_s_last_hour / worked_s_last_hour
    eta_s: float | None  # audio left at that rate
    failures: list[Failure] = field(default_factory=list)
    failed_total: int = 0
    workers: list[WorkerRow] = field(default_factory=list)
    partials: list[Partial] = field(default_factory=list)  # current transcripts with decoder warnings
    partial_total: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        d["hours_done"] = round(self.audio_s_done / 3600, 4)
        d["hours_left"] = round(self.audio_s_left / 3600, 4)
        return d


# A worker's Celery node name says which device it holds (worker.commands.node_name), and the job's
# worker_host is that name plus the pid: "base-gpu1-1234@linux-gpu:1234".
NODE_DEVICE = re.compile(r"-(cpu|gpu\d+)-\d+@")


def worker_device(host: str | None, recorded: str | None) -> str | None:
    """The device a worker holds: its transcripts' device string ("gpu (NVIDIA H100)") with the GPU
    index its node name carries ("gpu1") -> "gpu:1 (NVIDIA H100)"; the name alone before its first
    transcript; the recorded string alone for a worker whose name carries no device."""
    match = NODE_DEVICE.search(host or "")
    pinned = None if match is None else "cpu" if match[1] == "cpu" else f"gpu:{match[1][3:]}"
    if recorded is None or pinned is None or pinned == "cpu":
        return recorded or pinned
    if recorded == "gpu" or recorded.startswith("gpu ("):  # an engine that named the card, not its index
        return pinned + recorded[3:]
    return recorded


def _count_if(condition):
    return func.sum(case((condition, 1), else_=0))


def worked_s(intervals: Iterable[tuple[datetime, datetime]]) -> float:
    """Seconds covered by the union of (start, end) intervals: overlaps once, gaps not at all."""
    total = 0.0
    current_start = current_end = None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += (current_end - current_start).total_seconds()
            current_start, current_end = start, end
        elif end > current_end:
            current_end = end
    if current_end is not None:
        total += (current_end - current_start).total_seconds()
    return total


def _rate(audio_s: float, worked: float) -> float | None:
    return audio_s / worked if worked > 0 and audio_s > 0 else None


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
    # When each job finished in the window ran (failed ones too: their time was spent all the same).
    intervals: dict[str | None, list[tuple[datetime, datetime]]] = {}
    for host, started_at, finished_at in session.execute(
        select(Job.worker_host, Job.started_at, Job.finished_at).where(
            Job.status.in_([JobStatus.DONE, JobStatus.FAILED]), Job.finished_at >= since, Job.started_at.is_not(None)
        )
    ):
        intervals.setdefault(host, []).append((min(started_at, finished_at), finished_at))
    worked = worked_s(i for spans in intervals.values() for i in spans)
    rate = _rate(float(audio_last_hour), worked)
    eta_s = left_s / rate if rate and left_s > 0 else None

    failures = [
        Failure(job_id=j.id, path=j.path, attempts=j.attempts, error=j.error)
        for j in session.scalars(
            select(Job).where(Job.status == JobStatus.FAILED).order_by(Job.finished_at.desc(), Job.id).limit(MAX_FAILURES)
        )
    ]

    # Partial transcripts: the current transcript of a file (an old one, superseded by a new
    # transcript of the fixed file, no longer counts) with something the decoder had to say.
    current = current_transcripts().subquery()
    partial = (Transcript.warnings.is_not(None), Transcript.id.in_(select(current.c.transcript_id)))
    partial_total = session.scalar(select(func.count()).select_from(Transcript).where(*partial)) or 0
    partials = [
        Partial(job_id=job.id, path=job.path, decoded_s=t.decoded_s, stated_s=job.duration_s, warnings=t.warning_lines)
        for t, job in session.execute(
            select(Transcript, Job).join(Job, Job.id == Transcript.job_id).where(*partial)
            .order_by(Transcript.created_at.desc(), Transcript.id.desc()).limit(MAX_PARTIALS)
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
            func.max(Transcript.device),
        )
        .select_from(Job).join(Transcript, Transcript.job_id == Job.id, isouter=True)
        .where(Job.worker_host.is_not(None), or_(Job.status == JobStatus.RUNNING, Job.finished_at >= since))
        .group_by(Job.worker_host)
        .order_by(Job.worker_host)
    )
    for host, running, done, seconds, rtf, heartbeat, device in rows:
        if isinstance(heartbeat, str):  # SQLite returns max() of a timestamp as text
            heartbeat_text = heartbeat
        else:
            heartbeat_text = heartbeat.isoformat() if heartbeat else None
        host_worked = worked_s(intervals.get(host, ()))
        workers.append(WorkerRow(host=host, device=worker_device(host, device), running=int(running or 0),
                                 done_last_hour=int(done or 0),
                                 audio_s_last_hour=float(seconds or 0.0), worked_s_last_hour=host_worked,
                                 audio_hours_per_hour=_rate(float(seconds or 0.0), host_worked),
                                 mean_real_time_factor=float(rtf) if rtf is not None else None,
                                 last_heartbeat=heartbeat_text))
    return Report(
        counts=counts,
        audio_s_done=float(done_s or 0.0),
        audio_s_left=left_s,
        jobs_left_without_duration=unknown_left,
        done_last_hour=int(done_last_hour),
        audio_s_last_hour=float(audio_last_hour),
        worked_s_last_hour=worked,
        audio_hours_per_hour=rate,
        eta_s=eta_s,
        failures=failures,
        failed_total=counts["failed"],
        workers=workers,
        partials=partials,
        partial_total=int(partial_total),
    )
