"""Helpers for the worker tests: an isolated environment, real worker processes, waiting on the database.

Import what you need into a test module (fixtures are plain functions and context managers here,
not pytest plugins).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from worker.supervisor import stop_gracefully

REPO = Path(__file__).resolve().parents[1]
LEASE_S = 6  # short leases: a killed worker's job comes back within seconds
TEST_MODEL = "tiny.en"
# Short clips first: tiny.en on a 2-core CPU runs ~5x real time.
SHORT_CLIPS = (
    "timit_LDC93S1.wav",
    "librivox_sense_and_sensibility_01_austen_64kb-0880.wav",
    "librivox_sense_and_sensibility_01_austen_64kb-0930.wav",
    "librispeech_1221-135766-0002.wav",
    "librispeech_61-70968-0000.flac",
)


def worker_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path, broker_url: str | None, database_url: str | None = None) -> dict:
    """Set the settings for this test process and return the environment for the processes it starts."""
    from archive_asr.settings import get_settings

    monkeypatch.setenv("ARCHIVE_ASR_DATA_DIR", str(data_dir))
    monkeypatch.setenv("ARCHIVE_ASR_LEASE_S", str(LEASE_S))
    monkeypatch.setenv("ARCHIVE_ASR_MODEL", TEST_MODEL)
    monkeypatch.setenv("ARCHIVE_ASR_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("ARCHIVE_ASR_MODELS_DIR", str(REPO / ".data" / "test-models"))
    for name, value in (("ARCHIVE_ASR_BROKER_URL", broker_url), ("ARCHIVE_ASR_DATABASE_URL", database_url)):
        if value:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    return dict(os.environ)


def clean_redis(url: str) -> None:
    """Empty this test's Redis database (its own db number), so earlier runs leave nothing behind."""
    import redis

    redis.Redis.from_url(url).flushdb()


def copy_clips(shared_audio: Path, dest: Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Copy real clips from en/ (or "formats/<name>"); their reference .txt files stay behind."""
    dest.mkdir(parents=True, exist_ok=True)
    src = shared_audio / "en"
    names = names or tuple(sorted(p.name for p in src.iterdir() if p.suffix in (".wav", ".flac")))
    out = []
    for name in names:
        source = shared_audio / name if "/" in name else src / name
        shutil.copy(source, dest / source.name)
        out.append(dest / source.name)
    return out


# 17 distinct recordings of 3-17 s (~115 s in all): the en/ clips but the three longest, plus the
# TIMIT sentence as FLAC and Opus and JFK as MP3 (different bytes, so different jobs).
KILL_TEST_CLIPS = tuple(
    name for name in (
        "jfk.flac", "librispeech_1089-134686-0001.wav", "librispeech_1221-135766-0001.wav",
        "librispeech_1221-135766-0002.wav", "librispeech_1272-128104-0000_leopard.wav",
        "librispeech_1995-1837-0001.wav", "librispeech_2412-153948-0000.flac", "librispeech_61-70968-0000.flac",
        "librivox_sense_and_sensibility_01_austen_64kb-0870.wav", "librivox_sense_and_sensibility_01_austen_64kb-0880.wav",
        "librivox_sense_and_sensibility_01_austen_64kb-0890.wav", "librivox_sense_and_sensibility_01_austen_64kb-0920.wav",
        "librivox_sense_and_sensibility_01_austen_64kb-0930.wav", "timit_LDC93S1.wav",
        "formats/timit_LDC93S1.flac", "formats/timit_LDC93S1.opus", "formats/jfk.mp3",
    )
)


def enqueue(paths: list[Path], *, model: str = TEST_MODEL, word_timestamps: bool = True) -> list[int]:
    """Enqueue through the scheduler's own code, then dispatch; return the new job ids."""
    from scheduler.enqueue import Enqueuer, job_spec
    from worker.dispatch import dispatch_jobs

    spec = job_spec(model=model, language=None, word_timestamps=word_timestamps, priority=0)
    summary = Enqueuer(spec=spec).run([str(p) for p in paths])
    dispatch_jobs(summary.new_jobs)
    return summary.new_jobs


class WorkerProcess:
    """A real `archive-asr worker` process (same interpreter), its output in a log file."""

    def __init__(self, env: dict, log_path: Path, *args: str):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", "--model", TEST_MODEL, *args],
            env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 30) -> None:
        stop_gracefully(self.proc, timeout_s)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def workers(env: dict, tmp_path: Path, n: int, *args: str) -> Iterator[list[WorkerProcess]]:
    procs = [WorkerProcess(env, tmp_path / f"worker{i}.log", *args) for i in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


def job_rows() -> list:
    from sqlalchemy import func, select

    from models.db import session_scope
    from models.tables import Job, Transcript

    with session_scope() as session:
        n_transcripts = (
            select(func.count(Transcript.id)).where(Transcript.job_id == Job.id).correlate(Job).scalar_subquery()
        )
        return session.execute(
            select(Job.id, Job.path, Job.status, Job.error, Job.attempts, Job.worker_host, Job.duration_s,
                   n_transcripts.label("transcripts"))
            .order_by(Job.id)
        ).all()


def wait_until_settled(timeout_s: float, procs: list[WorkerProcess] = (), poll_s: float = 0.5) -> list:
    """Wait until no job is queued or running; fail with the workers' logs if it takes longer."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = job_rows()
        if all(r.status.value in ("done", "failed") for r in rows):
            return rows
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.log_path.name}\n{p.log()[-3000:]}" for p in procs)
            pytest.fail(f"jobs still pending after {timeout_s} s: {[(r.id, r.status.value) for r in rows]}\n{logs}")
        time.sleep(poll_s)


def celery_ready(log: str) -> bool:
    """Celery's own "<node>@<host> ready." line: the worker consumes from now on. (Not just "ready":
    the model's start-up line, "... its session ready in 0.84 s", may come first.)"""
    return re.search(r"\S+@\S+ ready\.", log) is not None


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
