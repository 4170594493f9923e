"""Turn scanned files into job rows, deduplicated by content.

The `files` table caches every path's size, mtime and sha256, so a second run stats files but
rehashes only those whose size or mtime changed. A job is unique per (sha256, model, language,
word timestamps) (`jobs.key`): identical content at two paths is one job; a file moved to a new
path (the old path gone) takes over its old row; a changed file gets a new job for its new content.
Work goes in chunks of CHUNK files, one short transaction each, so 100,000 files never hold one
long transaction or one huge IN list; the first chunks are smaller, so the first jobs reach the
workers while the rest is still being hashed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models.base import display_path, utcnow
from models.db import session_scope
from models.jobs import transition
from models.tables import File, Job, JobStatus, job_key
from scheduler.scan import Found, Scanner, Skipped

CHUNK = 500  # files per transaction
FIRST_CHUNK = 25  # the first chunks are smaller (25, 50, 100, ...): workers get jobs after seconds, not 500 files' hashing
HASH_BLOCK = 1 << 20  # 1 MiB reads: large enough for a NAS, small enough to show progress
HASH_THREADS = 4  # hashing is I/O-bound (hashlib releases the GIL); a NAS wants several reads in flight

# Whisper's language codes (mlx_whisper.tokenizer.LANGUAGES), copied so enqueueing needs no MLX.
LANGUAGES = frozenset(
    """en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur
    hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km
    sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw
    su yue""".split()
)


class EnqueueError(ValueError):
    """Raised when the enqueue options cannot work (an English-only model asked for German)."""


@dataclass(frozen=True)
class JobSpec:
    """What every job of one enqueue run asks for."""

    model: str
    language: str | None  # None: detect
    word_timestamps: bool = True
    priority: int = 0


def job_spec(*, model: str, language: str | None, word_timestamps: bool, priority: int) -> JobSpec:
    """Validate the options; English-only models (".en") are pinned to English."""
    language = (language or "").strip().lower() or None
    if language == "auto":
        language = None
    if language is not None and language not in LANGUAGES:
        raise EnqueueError(f"unknown language {language!r}: use a Whisper language code (en, de, fr, ...) or 'auto'")
    if model.endswith(".en"):
        if language not in (None, "en"):
            raise EnqueueError(f"{model} is English-only: drop --language {language} or pick a multilingual model (e.g. base)")
        language = "en"
    return JobSpec(model=model, language=language, word_timestamps=word_timestamps, priority=priority)


@dataclass
class Summary:
    found: int = 0  # audio files seen
    new_jobs: list[int] = field(default_factory=list)  # ids of jobs created (to dispatch)
    would_hash: int = 0  # dry run: files that a real run would hash (new or changed)
    would_create: int = 0  # dry run: jobs certain to be created (known content, no job for these options)
    unchanged: int = 0  # known path, same size and mtime (not rehashed)
    changed: int = 0  # known path, new content
    moved: int = 0  # new path, content of a path that is gone
    duplicates: int = 0  # new path, content already known at another path
    new_files: int = 0  # new path, content never seen
    skipped: list[Skipped] = field(default_factory=list)
    not_audio: int = 0
    excluded: int = 0
    audio_s: float = 0.0  # duration of every file found (those that could be probed)
    new_audio_s: float = 0.0  # duration of the new jobs
    unprobed: int = 0  # files whose container header gave no duration (maybe not audio)
    job_keys: set[str] = field(default_factory=set)  # `jobs.key` of every file found, new job or not
    requeued: int = 0  # failed jobs whose missing file ("no such file") was found again: queued again

    @property
    def missing(self) -> list[Skipped]:
        """Paths named by the caller that do not exist."""
        return [s for s in self.skipped if s.missing]

    def to_json(self, *, dry_run: bool) -> dict:
        return {
            "dry_run": dry_run,
            "found": self.found,
            "new": self.would_create if dry_run else len(self.new_jobs),
            "requeued": self.requeued,
            "unchanged": self.unchanged,
            "changed": self.changed,
            "moved": self.moved,
            "duplicates": self.duplicates,
            "new_files": self.new_files,
            "would_hash": self.would_hash,
            "skipped": len(self.skipped),
            "skipped_paths": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "missing_paths": [s.path for s in self.missing],
            "not_audio": self.not_audio,
            "excluded": self.excluded,
            "audio_hours": round(self.audio_s / 3600, 4),
            "new_audio_hours": round(self.new_audio_s / 3600, 4),
            "unprobed": self.unprobed,
            "job_ids": self.new_jobs,
        }


@dataclass(frozen=True)
class Hashed:
    found: Found
    sha256: str
    duration_s: float | None


def _open(av, f):
    """av.open, ignoring undecodable tags where PyAV has that switch (13-18: metadata_errors);
    PyAV 19 has no such argument: without this fallback every probe failed there."""
    try:
        return av.open(f, metadata_errors="ignore")
    except TypeError:
        return av.open(f)


def probe_duration(path_bytes: bytes) -> float | None:
    """Seconds of audio from the container header (no decoding); None when it can't tell.

    libsndfile first (WAV, FLAC, AIFF, Ogg, MP3): 0.25 ms a file here against PyAV's ~5 ms (~9 ms
    for a WAV), and every new file is probed before the first is hashed (`_longest_first`).
    PyAV for the rest (AAC/M4A, MP4, WebM, Opus in older libsndfiles).
    """
    import soundfile  # imported here, as av below: `status` and `search` need neither

    try:
        info = soundfile.info(os.fsdecode(path_bytes))
        if info.frames > 0 and info.samplerate > 0:
            return info.frames / info.samplerate
    except Exception:  # not a format libsndfile reads, or damaged: ask PyAV
        pass
    import av  # PyAV loads ffmpeg's libraries

    try:
        with open(path_bytes, "rb") as f, _open(av, f) as container:
            if container.duration:
                return container.duration / av.time_base
            for stream in container.streams.audio:
                if stream.duration and stream.time_base:
                    return float(stream.duration * stream.time_base)
    except Exception:  # any probe failure only means "duration unknown"; the worker decodes for real
        return None
    return None


def hash_file(path_bytes: bytes, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path_bytes, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
            if on_bytes:
                on_bytes(len(block))
    return digest.hexdigest()


def _chunks(items: Iterable, size: int, first: int | None = None) -> Iterator[list]:
    """Lists of ``size`` items; with ``first``, the first lists ramp up from it, doubling."""
    it = iter(items)
    n = min(first or size, size)
    while batch := list(islice(it, n)):
        yield batch
        n = min(2 * n, size)


def _insert_ignoring_conflicts(session: Session, model):
    """INSERT ... ON CONFLICT DO NOTHING (a second enqueue running at the same time is harmless).

    Core, on the table, executed with a list of rows: SQLAlchemy batches them ("insertmanyvalues"),
    far cheaper to compile than one giant multi-VALUES statement.
    """
    table = model.__table__
    dialect = session.get_bind().dialect.name
    return (sqlite.insert(table) if dialect == "sqlite" else postgresql.insert(table)).on_conflict_do_nothing()


class Enqueuer:
    """One enqueue run: scan, hash what's new or changed, write files and jobs rows in chunks."""

    def __init__(self, *, spec: JobSpec, dry_run: bool = False, url: str | None = None,
                 on_hash_start: Callable[[int, int], None] | None = None,
                 on_bytes: Callable[[int], None] | None = None,
                 on_skip: Callable[[Skipped], None] | None = None,
                 on_found: Callable[[Found], None] | None = None,
                 on_jobs: Callable[[list[int]], None] | None = None) -> None:
        self.spec = spec
        self.dry_run = dry_run
        self.url = url
        self.on_hash_start = on_hash_start  # (files, bytes) about to be hashed in this chunk
        self.on_bytes = on_bytes
        self.on_skip = on_skip
        self.on_found = on_found  # each audio file the scan finds
        # ids of jobs just committed, chunk by chunk: workers start while the rest is still hashing
        self.on_jobs = on_jobs
        self.summary = Summary()
        self._durations: dict[bytes, float | None] = {}  # new files' probed durations (`_longest_first`)

    def run(self, paths: list[str | bytes], *, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Summary:
        scanner = Scanner(include=include, exclude=exclude)
        # largest first: the order `_longest_first` keeps among equal (or unknown) durations
        found = sorted(self._found(scanner.scan(paths)), key=lambda f: -f.size)
        self.summary.not_audio = scanner.not_audio
        self.summary.excluded = scanner.excluded
        # First look every path up (reads only), so the progress bar knows how much there is to hash.
        plan = [self._classify(batch) for batch in _chunks(found, CHUNK)]
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            if self.dry_run:
                for unchanged, to_hash in plan:
                    self._dry_run(unchanged, to_hash, pool)
                return self.summary
            plan = self._longest_first(plan, pool)
            if self.on_hash_start:
                to_hash = [f for _, batch in plan for f in batch]
                self.on_hash_start(len(to_hash), sum(f.size for f in to_hash))
            for unchanged, to_hash in plan:
                before = len(self.summary.new_jobs)
                self._write(unchanged, to_hash, pool)  # commits
                if self.on_jobs and len(self.summary.new_jobs) > before:
                    self.on_jobs(self.summary.new_jobs[before:])
        return self.summary

    def _longest_first(self, plan: list[tuple[list[tuple[Found, File]], list[Found]]],
                       pool: ThreadPoolExecutor) -> list[tuple[list[tuple[Found, File]], list[Found]]]:
        """The same files in chunks ordered longest first by duration, the first chunks small.

        Each chunk is dispatched as it is written and a worker decodes a file's windows one after
        another, so a long file sent last is a tail the fleet waits on. Size does not tell length
        across containers: on an H200 pair, ordered by size, the last ~45 files of a 24.6 h archive
        were MP3s of 1.7 to 4 minutes (a tenth of a WAV's bytes) and each worker ran its last 6 rounds
        part-empty. New files' headers are probed here, in the hashing threads, once (`_hash` reuses
        the result): 1,800 files put 0.8 s before the first chunk on a 2-core box. Known files have
        their duration in `files`. Unknown durations go first: they fail fast if damaged, and a long
        one is no tail.
        """
        new = [f for _, batch in plan for f in batch]
        paths = [f.path_bytes for f in new]
        self._durations = dict(zip(paths, pool.map(probe_duration, paths)))
        items = [(row.duration_s, (found, row)) for unchanged, _ in plan for found, row in unchanged]
        items += [(self._durations[f.path_bytes], f) for f in new]
        items.sort(key=lambda item: -item[0] if item[0] is not None else float("-inf"))  # stable: larger first on ties
        return [
            ([x for _, x in chunk if not isinstance(x, Found)], [x for _, x in chunk if isinstance(x, Found)])
            for chunk in _chunks(items, CHUNK, FIRST_CHUNK)
        ]

    def _skip(self, skipped: Skipped) -> None:
        self.summary.skipped.append(skipped)
        if self.on_skip:
            self.on_skip(skipped)

    def _found(self, entries: Iterable[Found | Skipped]) -> Iterator[Found]:
        for entry in entries:
            if isinstance(entry, Skipped):
                self._skip(entry)
            else:
                if self.on_found:
                    self.on_found(entry)
                yield entry

    def _hash(self, found: Found) -> Hashed | Skipped:
        try:
            sha = hash_file(found.path_bytes, self.on_bytes)
        except OSError as e:
            return Skipped(found.path_bytes, f"cannot read: {e.strerror or e}")
        return Hashed(found, sha, self._durations[found.path_bytes])  # probed by `_longest_first`

    def _classify(self, batch: list[Found]) -> tuple[list[tuple[Found, File]], list[Found]]:
        """Split a chunk into files known unchanged (same path, size, mtime) and files to hash."""
        with session_scope(self.url) as session:
            known = {
                f.path_bytes: f
                for f in session.scalars(select(File).where(File.path_bytes.in_([b.path_bytes for b in batch])))
            }
        unchanged, to_hash = [], []
        for found in batch:
            row = known.get(found.path_bytes)
            if row is not None and row.size == found.size and row.mtime_ns == found.mtime_ns:
                unchanged.append((found, row))
            else:
                to_hash.append(found)
        self.summary.found += len(batch)
        self.summary.unchanged += len(unchanged)
        return unchanged, to_hash

    def _write(self, unchanged: list[tuple[Found, File]], to_hash: list[Found], pool: ThreadPoolExecutor) -> None:
        """Hash one chunk's new and changed files, then write its rows in one short transaction."""
        s = self.summary
        hashed: list[Hashed] = []
        for result in pool.map(self._hash, to_hash):
            if isinstance(result, Skipped):
                s.found -= 1
                self._skip(result)
            else:
                hashed.append(result)
        now = utcnow()
        with session_scope(self.url) as session:
            if unchanged:
                session.execute(
                    update(File).where(File.id.in_([row.id for _, row in unchanged])).values(last_seen_at=now)
                )
            known = {
                f.path_bytes: f
                for f in session.scalars(select(File).where(File.path_bytes.in_([h.found.path_bytes for h in hashed])))
            } if hashed else {}
            new_rows = self._record_hashed(session, hashed, known, now)
            if new_rows:
                session.connection().execute(_insert_ignoring_conflicts(session, File), new_rows)
            # (path_bytes, sha256, size, mtime_ns, duration_s) of every file that should have a job
            wanted = [(f.path_bytes, row.sha256, f.size, f.mtime_ns, row.duration_s) for f, row in unchanged]
            wanted += [(h.found.path_bytes, h.sha256, h.found.size, h.found.mtime_ns, h.duration_s) for h in hashed]
            for *_, duration_s in wanted:
                if duration_s is None:
                    s.unprobed += 1
                else:
                    s.audio_s += duration_s
            self._create_jobs(session, wanted, now)

    def _record_hashed(self, session: Session, hashed: list[Hashed], known: dict[bytes, File], now) -> list[dict]:
        """Update rows of changed and moved files; return rows to insert for new paths."""
        s = self.summary
        new_paths = [h for h in hashed if h.found.path_bytes not in known]
        elsewhere: dict[str, list[File]] = {}
        if new_paths:
            for row in session.scalars(select(File).where(File.sha256.in_({h.sha256 for h in new_paths}))):
                elsewhere.setdefault(row.sha256, []).append(row)
        rows = []
        for h in hashed:
            f = h.found
            values = dict(size=f.size, mtime_ns=f.mtime_ns, sha256=h.sha256, duration_s=h.duration_s, last_seen_at=now)
            row = known.get(f.path_bytes)
            if row is not None:
                old_sha = row.sha256
                session.execute(update(File).where(File.id == row.id).values(**values))
                if old_sha != h.sha256:
                    s.changed += 1
                    self._orphan_old_content(session, path_bytes=f.path_bytes, old_sha=old_sha)
                else:
                    s.unchanged += 1  # touched, same content
                continue
            gone = [r for r in elsewhere.get(h.sha256, []) if not os.path.lexists(r.path_bytes)]
            if gone:
                # Moved (or renamed): the old row follows the file, and so do jobs that pointed there.
                old = gone[0]
                old_path_bytes = old.path_bytes  # read before the UPDATE below syncs `old` to the new path
                elsewhere[h.sha256].remove(old)
                session.execute(
                    update(File).where(File.id == old.id).values(path_bytes=f.path_bytes, path=display_path(f.path_bytes), **values)
                )
                session.execute(
                    update(Job).where(Job.path_bytes == old_path_bytes)
                    .values(path_bytes=f.path_bytes, path=display_path(f.path_bytes), size=f.size, mtime=f.mtime_ns / 1e9)
                )
                s.moved += 1
                continue
            if h.sha256 in elsewhere:
                s.duplicates += 1
            else:
                s.new_files += 1
            elsewhere.setdefault(h.sha256, [])
            rows.append(dict(path_bytes=f.path_bytes, path=display_path(f.path_bytes), first_seen_at=now, **values))
        return rows

    def _orphan_old_content(self, session: Session, *, path_bytes: bytes, old_sha: str) -> None:
        """A file changed under queued jobs for its old content: point them at another copy, or fail them.

        Otherwise a worker would read the new content and file it under the old content's job.
        """
        jobs = list(session.scalars(
            select(Job).where(Job.path_bytes == path_bytes, Job.sha256 == old_sha, Job.status == JobStatus.QUEUED)
        ))
        if not jobs:
            return
        copies = [p for p in session.scalars(select(File.path_bytes).where(File.sha256 == old_sha))
                  if p != path_bytes and os.path.lexists(p)]
        for job in jobs:
            if copies:
                session.execute(update(Job).where(Job.id == job.id).values(path_bytes=copies[0], path=display_path(copies[0])))
            else:
                transition(session=session, job_id=job.id, to=JobStatus.FAILED, from_={JobStatus.QUEUED},
                           error="the file changed on disk before it was transcribed; its new content has its own job",
                           finished_at=utcnow())

    def _create_jobs(self, session: Session, wanted: list[tuple[bytes, str, int, int, float | None]], now) -> None:
        spec = self.spec
        by_key: dict[str, dict] = {}
        for path_bytes, sha, size, mtime_ns, duration_s in wanted:
            key = job_key(sha256=sha, model=spec.model, language=spec.language, word_timestamps=spec.word_timestamps)
            by_key.setdefault(key, dict(
                key=key, path_bytes=path_bytes, path=display_path(path_bytes), size=size, mtime=mtime_ns / 1e9,
                sha256=sha, duration_s=duration_s, status=JobStatus.QUEUED, attempts=0, priority=spec.priority,
                model=spec.model, language=spec.language, word_timestamps=spec.word_timestamps, created_at=now,
            ))
        self.summary.job_keys.update(by_key)
        if not by_key:
            return
        existing = set(session.scalars(select(Job.key).where(Job.key.in_(list(by_key)))))
        self._requeue_found_again(session, {key: by_key[key] for key in existing})
        rows = [row for key, row in by_key.items() if key not in existing]
        if not rows:
            return
        stmt = _insert_ignoring_conflicts(session, Job).returning(Job.__table__.c.id)
        ids = list(session.connection().execute(stmt, rows).scalars())
        self.summary.new_jobs += ids
        created = {row["key"] for row in rows} if len(ids) == len(rows) else set(
            session.scalars(select(Job.key).where(Job.id.in_(ids)))
        )
        self.summary.new_audio_s += sum(r["duration_s"] or 0.0 for r in rows if r["key"] in created)

    def _requeue_found_again(self, session: Session, found: dict[str, dict]) -> None:
        """A job that failed because its file was missing ("no such file": moved, a NAS not mounted)
        goes back to the queue now that the scan found its content again, at the path found.
        Its id joins new_jobs, so it is dispatched with them."""
        if not found:
            return
        failed = session.scalars(select(Job).where(Job.key.in_(list(found)), Job.status == JobStatus.FAILED))
        for job in list(failed):
            if "no such file" not in (job.error or "").lower():
                continue
            row = found[job.key]
            if transition(session=session, job_id=job.id, to=JobStatus.QUEUED, from_={JobStatus.FAILED},
                          path_bytes=row["path_bytes"], path=row["path"], attempts=0, error=None, worker_host=None,
                          finished_at=None, dispatched_at=None, lease_expires_at=None):
                self.summary.new_jobs.append(job.id)
                self.summary.requeued += 1

    def _dry_run(self, unchanged: list[tuple[Found, File]], to_hash: list[Found], pool: ThreadPoolExecutor) -> None:
        """Count without hashing: unchanged files may still lack a job for this model/language."""
        s = self.summary
        s.would_hash += len(to_hash)
        keys = {
            job_key(sha256=row.sha256, model=self.spec.model, language=self.spec.language,
                    word_timestamps=self.spec.word_timestamps): row
            for _, row in unchanged
        }
        have: set[str] = set()
        if keys:
            with session_scope(self.url) as session:
                have = set(session.scalars(select(Job.key).where(Job.key.in_(list(keys)))))
        for _, row in unchanged:
            if row.duration_s is None:
                s.unprobed += 1
            else:
                s.audio_s += row.duration_s
        for key, row in keys.items():
            if key not in have:
                s.would_create += 1
                s.new_audio_s += row.duration_s or 0.0
        for found, duration_s in zip(to_hash, pool.map(lambda f: probe_duration(f.path_bytes), to_hash)):
            if duration_s is None:
                s.unprobed += 1
            else:
                s.audio_s += duration_s
