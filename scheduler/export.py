"""Transcripts as files: txt, srt, vtt, json, tsv; and which jobs a JOB_OR_PATH argument means."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from archive_asr import records
from models.base import display_path
from models.search import current_transcripts
from models.tables import File, Job, JobStatus, Segment, Transcript

FORMATS = ("txt", "srt", "vtt", "json", "tsv")


class NotFound(LookupError):
    """Raised when a JOB_OR_PATH argument names nothing in the database."""


def printable(path: str) -> str:
    """A path on one line: newlines and tabs in file names shown escaped."""
    return path.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") if any(
        c in path for c in "\n\r\t"
    ) else path


def resolve_jobs(*, session: Session, refs: tuple[str, ...], status: JobStatus | None,
                 latest_per_file: bool = False) -> list[Job]:
    """Jobs named by id, by file path (any path holding the content), or by folder (everything under it).

    With no refs: every job in `status`. With latest_per_file, a file named on its own that has
    jobs for several models gives only the most recently finished one, and paths and folders give
    only current transcripts (one per file: its content's newest; see models.search).
    """
    stmt = select(Job).order_by(Job.path, Job.id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if latest_per_file:
        stmt = stmt.where(Job.id.in_(select(current_transcripts().subquery().c.job_id)))
    if not refs:
        return list(session.scalars(stmt))
    jobs: dict[int, Job] = {}
    for ref in refs:
        if ref.isdigit() and not os.path.exists(ref):
            job = session.get(Job, int(ref))
            if job is None:
                raise NotFound(f"no job {ref}")
            if status is None or job.status == status:
                jobs[job.id] = job
            continue
        path_bytes = os.path.abspath(os.fsencode(ref))
        if os.path.isdir(path_bytes):
            prefix = display_path(path_bytes).rstrip("/") + "/"
            shas = select(File.sha256).where(File.path.startswith(prefix, autoescape=True))
            found = list(session.scalars(stmt.where(Job.sha256.in_(shas))))
        else:
            shas = select(File.sha256).where(File.path_bytes == path_bytes)
            found = list(session.scalars(stmt.where(Job.sha256.in_(shas)).order_by(None).order_by(Job.finished_at.desc())))
            if latest_per_file:
                found = found[:1]
        if not found and not session.scalar(select(File.id).where(File.path_bytes == path_bytes)) and not os.path.isdir(path_bytes):
            raise NotFound(f"{printable(display_path(path_bytes))} is not in the database (enqueue it first)")
        for job in found:
            jobs[job.id] = job
    return list(jobs.values())


def load_transcript(*, session: Session, job_id: int) -> Transcript | None:
    return session.scalar(
        select(Transcript)
        .where(Transcript.job_id == job_id)
        .options(selectinload(Transcript.segments).selectinload(Segment.words), selectinload(Transcript.job))
    )


def _clock(seconds: float, sep: str) -> str:
    ms = round(max(seconds, 0.0) * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_txt(t: Transcript) -> str:
    """One line per segment; a partial transcript starts with the decoder's warnings as `# ` lines."""
    header = "".join(f"# {w}\n" for w in t.warning_lines)
    return header + ("\n" if header else "") + "".join(seg.text.strip() + "\n" for seg in t.segments)


def to_srt(t: Transcript) -> str:
    blocks = [
        f"{i}\n{_clock(seg.start_s, ',')} --> {_clock(seg.end_s, ',')}\n{seg.text.strip().replace('-->', '->')}\n"
        for i, seg in enumerate(t.segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(t: Transcript) -> str:
    blocks = [
        f"{_clock(seg.start_s, '.')} --> {_clock(seg.end_s, '.')}\n{seg.text.strip().replace('-->', '->')}\n"
        for seg in t.segments
    ]
    notes = "".join(f"NOTE {w.replace('-->', '->')}\n\n" for w in t.warning_lines)  # a partial transcript says why
    return "WEBVTT\n\n" + notes + "\n".join(blocks)


def to_tsv(t: Transcript) -> str:
    """openai-whisper's tsv: start and end in integer milliseconds, then the text."""
    lines = ["start\tend\ttext"]
    for seg in t.segments:
        text = " ".join(seg.text.split())  # tabs and newlines inside text would break columns
        lines.append(f"{round(seg.start_s * 1000)}\t{round(seg.end_s * 1000)}\t{text}")
    return "\n".join(lines) + "\n"


def to_record(t: Transcript) -> records.Transcript:
    """A transcript row (segments and words loaded) as the engine's record, for Transcript.to_json."""
    return records.Transcript(
        language=t.language,
        language_probability=t.language_probability,
        duration_s=t.duration_s,
        text=t.text,
        segments=tuple(
            records.Segment(
                start_s=seg.start_s, end_s=seg.end_s, text=seg.text, avg_logprob=seg.avg_logprob,
                no_speech_prob=seg.no_speech_prob, compression_ratio=seg.compression_ratio, temperature=seg.temperature,
                words=tuple(records.Word(start_s=w.start_s, end_s=w.end_s, word=w.word, probability=w.probability)
                            for w in seg.words),
            )
            for seg in t.segments
        ),
        timing=records.Timing(audio_s=t.duration_s, wall_s=t.wall_s, batch_size=t.batch_size, device=t.device,
                              model=t.model),
        options=dict(t.options or {}),
        decoded_s=t.decoded_s,
        warnings=tuple(t.warning_lines),
    )


def render(t: Transcript, fmt: str) -> str:
    if fmt == "json":
        job = t.job
        return json.dumps(to_record(t).to_json(job.path, job_id=job.id, sha256=job.sha256), ensure_ascii=False, indent=2) + "\n"
    return {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "tsv": to_tsv}[fmt](t)


NAME_MAX_BYTES = 255  # the longest file name ext4, APFS and most other filesystems take


def output_name(t: Transcript, fmt: str, taken: set[str]) -> str:
    """`<file stem>.<fmt>`, with the job id added when two files share a stem; a stem too long for
    the filesystem is shortened (the job id added, so shortened names stay apart)."""
    stem = Path(os.fsdecode(t.job.path_bytes)).stem or f"job-{t.job_id}"
    name = f"{stem}.{fmt}"
    if name in taken or len(os.fsencode(name)) > NAME_MAX_BYTES:
        suffix = f"-{t.job_id}.{fmt}"
        while len(os.fsencode(stem + suffix)) > NAME_MAX_BYTES:
            stem = stem[:-1]
        name = stem + suffix
    taken.add(name)
    return name
