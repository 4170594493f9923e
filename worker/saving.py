"""Saving a finished transcript: never thrown away because the database is away for a while.

`save_transcript` writes the transcript and marks its job done (models.jobs.finish_job, one
transaction). When the database does not answer, the transcript is first spooled to
``<data dir>/spool/`` (one JSON file per transcript, 0600, fsynced, flock'ed by the process that
keeps trying), then saving is tried again every few seconds for as long as the outage lasts.
The outage is logged once when it starts, once a minute while it lasts (with its duration) and
once when it ends; never a traceback per attempt. A process that dies meanwhile (killed, a
cold shutdown) leaves its file in the spool, and `flush_spool`, run when a worker starts, saves
it then. A transcript is only ever dropped when its job is already done (or failed, or deleted)
by someone else, which `finish_job` decides in its transaction.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from archive_asr import records
from archive_asr.errors import DatabaseUnavailable
from archive_asr.settings import get_settings, private_dir

log = logging.getLogger(__name__)

SPOOL_DIR_NAME = "spool"  # in the data folder: transcripts waiting for the database
REJECTED_DIR_NAME = "rejected"  # in the spool: files the database refused for good (kept for a human)
SPOOL_FORMAT = 1
# Seconds between save attempts while the database is away: quick at first (a blip), then every
# 5 s, so the transcript lands within seconds of the database's return, before the reconciler
# hands the job (whose lease ran out meanwhile) to another worker. Each attempt is one connection try.
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 3.0, 5.0)
LOG_EVERY_S = 60.0  # while the outage lasts, one line a minute
# One transcript is written at a time in a process. The files of a round finish together (about 8
# of 64 rows a round on a GPU), and their task threads then all build and send their rows, ~8 ms
# of Python each (800 words, PostgreSQL), crowding the GIL just when the engine's driver thread
# prepares the next round. benchmarks/bench_save_gil.py measures that on a stand-in for the
# driver: 8 concurrent saves doubled its time, 8 saves one after another left it nearly as it
# was. (On an H200 the driver spent ~0.23 s between rounds inside a worker, 0.06 s in the engine
# alone; how much of that the saves cause is not measured there yet.)
_one_writer = threading.Lock()


def database_down(e: BaseException) -> bool:
    """Whether `e` means "the database does not answer (now)", as opposed to a bad write."""
    return isinstance(e, (DatabaseUnavailable, OperationalError, InterfaceError)) or (
        isinstance(e, DBAPIError) and e.connection_invalidated
    )


def spool_dir() -> Path:
    return get_settings().data_dir / SPOOL_DIR_NAME


# --- the records as JSON -------------------------------------------------------------------------


def _build(cls, values: dict):
    """A record from a dict, ignoring fields this version does not know (a spool from another version)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def transcript_to_json(transcript: records.Transcript) -> dict:
    return dataclasses.asdict(transcript)


def transcript_from_json(values: dict) -> records.Transcript:
    segments = tuple(
        _build(records.Segment, {**s, "words": tuple(_build(records.Word, w) for w in s.get("words", ()))})
        for s in values.get("segments", ())
    )
    return _build(records.Transcript, {
        **values,
        "segments": segments,
        "timing": _build(records.Timing, values["timing"]),
        "warnings": tuple(values.get("warnings", ())),
    })


# --- one write -----------------------------------------------------------------------------------


def _write(job_id: int, transcript: records.Transcript) -> bool:
    from models.db import session_scope
    from models.jobs import finish_job

    with _one_writer, session_scope() as session:
        return finish_job(session=session, job_id=job_id, transcript=transcript)


def _first_line(e: BaseException) -> str:
    lines = str(getattr(e, "orig", None) or e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# --- the spool file ------------------------------------------------------------------------------


class SpoolFile:
    """One transcript on disk, locked by the process that is still trying to save it."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def write(cls, *, job_id: int, holder: str, transcript: records.Transcript) -> SpoolFile:
        """Write, fsync and lock the file (raises OSError, e.g. on a full disk)."""
        folder = private_dir(spool_dir())
        name = f"job-{job_id}.{os.getpid()}.{time.time_ns()}.json"
        tmp = folder / f".{name}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until saved: flush_spool in another worker leaves it alone
            body = {
                "format": SPOOL_FORMAT,
                "job_id": job_id,
                "holder": holder,
                "spooled_at": time.time(),
                "transcript": transcript_to_json(transcript),
            }
            os.write(fd, json.dumps(body, ensure_ascii=False).encode())
            os.fsync(fd)
            os.replace(tmp, folder / name)
            _fsync_dir(folder)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return cls(folder / name, fd)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays for flush_spool unless removed
            self._fd = None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reject(path: Path, reason: str) -> None:
    """Move a spool file the database refuses for good aside, so no start-up tries it again."""
    folder = private_dir(path.parent / REJECTED_DIR_NAME)
    try:
        os.replace(path, folder / path.name)
    except OSError:
        return
    log.error("spooled transcript %s could not be saved (%s); moved to %s", path.name, reason, folder)


# --- saving --------------------------------------------------------------------------------------


class _Outage:
    """The log of one outage: a line when it starts, one a minute while it lasts, one when it ends."""

    def __init__(self, job_id: int, error: BaseException):
        self.job_id = job_id
        self.started = time.monotonic()
        self.next_log = self.started + LOG_EVERY_S
        self.error = _first_line(error)
        log.warning("database unavailable while saving job %s (%s); the transcript is kept and saving is "
                    "retried until the database is back", job_id, self.error)

    def still(self, error: BaseException) -> None:
        self.error = _first_line(error)
        now = time.monotonic()
        if now >= self.next_log:
            self.next_log = now + LOG_EVERY_S
            log.warning("database still unavailable after %s; job %s's transcript is waiting to be saved (%s)",
                        _duration(now - self.started), self.job_id, self.error)

    def over(self, saved: bool) -> None:
        took = _duration(time.monotonic() - self.started)
        if saved:
            log.info("database back after %s: job %s saved", took, self.job_id)
        else:
            log.info("database back after %s: job %s was finished elsewhere meanwhile; this transcript is "
                        "not needed", took, self.job_id)


def save_transcript(*, job_id: int, holder: str, transcript: records.Transcript) -> bool:
    """Save the transcript and mark the job done; True once it is in the database.

    False when the job is no longer running or queued (done or failed by someone else, deleted):
    nothing to save. While the database does not answer this blocks, the transcript spooled to
    the data folder so that it outlives this process; any other error is raised as it comes.
    """
    try:
        return _write(job_id, transcript)
    except Exception as e:
        if not database_down(e):
            raise
        outage = _Outage(job_id, e)
    try:
        spooled: SpoolFile | None = SpoolFile.write(job_id=job_id, holder=holder, transcript=transcript)
        log.warning("job %s's transcript spooled to %s (saved at the next worker start if this process stops)",
                    job_id, spooled.path)
    except OSError as e:
        spooled = None
        log.warning("could not spool job %s's transcript (%s); keeping it in memory", job_id, e.strerror or e)
    try:
        attempt = 0
        while True:
            time.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)])
            attempt += 1
            try:
                saved = _write(job_id, transcript)
            except Exception as e:
                if database_down(e):
                    outage.still(e)
                    continue
                if spooled is not None:
                    spooled.close()
                    _reject(spooled.path, _first_line(e))
                raise
            outage.over(saved)
            if spooled is not None:
                spooled.remove()
            return saved
    finally:
        if spooled is not None:
            spooled.close()  # still there if we were interrupted: flush_spool saves it later


def flush_spool(holder: str) -> int:
    """Save the transcripts earlier processes spooled (worker start-up); return how many were saved.

    Files another live process is still trying to save are left to it. If the database does not
    answer, the rest stay for the next start. A transcript whose job was finished elsewhere
    meanwhile is dropped; one the database refuses for good is moved to spool/rejected/.
    """
    folder = spool_dir()
    if not folder.is_dir():
        return 0
    saved = 0
    for path in sorted(folder.glob("job-*.json")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # saved by its own process just now
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process is still trying to save it
            if os.fstat(fd).st_nlink == 0:
                continue  # removed between our open and our lock
            try:
                with open(path, encoding="utf-8") as f:
                    body = json.load(f)
                job_id = int(body["job_id"])
                transcript = transcript_from_json(body["transcript"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                _reject(path, f"unreadable: {e}")
                continue
            try:
                ok = _write(job_id, transcript)
            except Exception as e:
                if database_down(e):
                    log.warning("database unavailable (%s): spooled transcripts stay in %s for the next start",
                                _first_line(e), folder)
                    break
                _reject(path, _first_line(e))
                continue
            path.unlink(missing_ok=True)
            if ok:
                saved += 1
                log.info("job %s: saved the transcript spooled by %s (now %s)", job_id, body.get("holder"), holder)
            else:
                log.info("job %s: spooled transcript dropped, the job was finished elsewhere", job_id)
        finally:
            os.close(fd)
    return saved
