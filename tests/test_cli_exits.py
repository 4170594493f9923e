"""Exit codes and messages scripts can rely on: enqueue of a missing path, the embedded broker's
one-line notice, export of a job that has no transcript. Real databases, real CLI invocations."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from cli import main
from models.db import session_scope
from models.jobs import claim_job, fail_job, finish_job
from models.tables import Job
from tests.fixtures_db import db_url, make_transcript  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "tests" / "data" / "samples"


def _archive_asr() -> list[str]:
    return [str(Path(sys.executable).parent / "archive-asr")]


def _queued_names() -> set[str]:
    with session_scope() as s:
        return {Path(j.path).name for j in s.scalars(select(Job))}


def test_enqueue_queues_the_paths_that_exist_then_exits_nonzero_for_a_missing_one(db_url, tmp_path: Path):
    root = tmp_path / "archive"
    shutil.copytree(SAMPLES, root)
    missing = tmp_path / "no such tape.flac"
    result = CliRunner().invoke(main, ["enqueue", "--no-dispatch", str(root / "jfk.flac"), str(missing),
                                       str(root / "librispeech_61-70968-0000.flac")])
    assert result.exit_code == 1, result.output
    assert f"cannot access {missing}: no such file or directory" in result.stderr
    assert "new: 2 job(s)" in result.stdout and "not found: 1 path(s)" in result.stdout
    assert _queued_names() == {"jfk.flac", "librispeech_61-70968-0000.flac"}  # the rest was queued

    # --quiet still names it (an error, not a per-file message); --json carries it; nothing else changes.
    quiet = CliRunner().invoke(main, ["enqueue", "--no-dispatch", "--quiet", "--json", str(root), str(missing)])
    assert quiet.exit_code == 1 and str(missing) in quiet.stderr
    report = json.loads(quiet.stdout)
    assert report["missing_paths"] == [str(missing)] and report["new"] == 1
    assert _queued_names() == {"jfk.flac", "librispeech_61-70968-0000.flac", "librispeech_1221-135766-0002.wav"}

    # Every path there: exit 0 (nothing new to do is no error either).
    assert CliRunner().invoke(main, ["enqueue", "--no-dispatch", "-q", str(root)]).exit_code == 0


@pytest.mark.timeout(120)
def test_enqueue_says_once_that_it_started_the_embedded_broker_and_how_to_stop_it(data_dir: Path, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHIVE_ASR_")}
    env["ARCHIVE_ASR_DATA_DIR"] = str(data_dir)
    root = tmp_path / "archive"
    shutil.copytree(SAMPLES, root)
    try:
        first = subprocess.run([*_archive_asr(), "enqueue", str(root / "jfk.flac")], env=env, capture_output=True,
                               text=True, timeout=60)
        assert first.returncode == 0, first.stderr
        notes = [line for line in first.stderr.splitlines() if "broker" in line]
        assert len(notes) == 1 and "started the embedded Valkey broker" in notes[0], first.stderr
        assert "`archive-asr broker stop` stops it" in notes[0]
        assert "dispatched 1 job(s)" in first.stdout
        # It outlived the command; the next enqueue finds it running and says nothing about it.
        status = subprocess.run([*_archive_asr(), "broker", "status", "--json"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert json.loads(status.stdout)["running"] is True
        second = subprocess.run([*_archive_asr(), "enqueue", str(root)], env=env, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 0 and "broker" not in second.stderr and "dispatched 2 job(s)" in second.stdout
    finally:
        subprocess.run([*_archive_asr(), "broker", "stop"], env=env, capture_output=True, timeout=60)


@pytest.fixture
def three_jobs(db_url, tmp_path: Path) -> dict[str, int]:
    """The sample clips enqueued: jfk done, one failed with a reason, one running on a worker."""
    root = tmp_path / "archive"
    shutil.copytree(SAMPLES, root)
    assert CliRunner().invoke(main, ["enqueue", "--no-dispatch", "-q", str(root)]).exit_code == 0
    with session_scope() as s:
        jobs = {Path(j.path).name: j.id for j in s.scalars(select(Job))}
        claim_job(session=s, job_id=jobs["jfk.flac"], worker_host="mac-mini-1", lease_s=60)
        finish_job(session=s, job_id=jobs["jfk.flac"], transcript=make_transcript([(0.0, 4.0, "my fellow Americans")]))
        claim_job(session=s, job_id=jobs["librispeech_1221-135766-0002.wav"], worker_host="linux-gpu", lease_s=60)
        fail_job(session=s, job_id=jobs["librispeech_1221-135766-0002.wav"],
                 error="cannot decode audio: invalid data found", retryable=False)
        claim_job(session=s, job_id=jobs["librispeech_61-70968-0000.flac"], worker_host="linux-gpu", lease_s=60)
    return {name: job_id for name, job_id in jobs.items()} | {"root": root}


def test_export_of_a_failed_or_running_job_says_so_with_the_reason(three_jobs):
    root = three_jobs["root"]
    failed = CliRunner().invoke(main, ["export", str(root / "librispeech_1221-135766-0002.wav")])
    assert failed.exit_code == 1 and failed.stdout == ""
    assert "failed: cannot decode audio: invalid data found" in failed.stderr
    assert "librispeech_1221-135766-0002.wav" in failed.stderr

    running = CliRunner().invoke(main, ["export", str(three_jobs["librispeech_61-70968-0000.flac"])])
    assert running.exit_code == 1 and "still running on linux-gpu" in running.stderr

    # Named together with a finished one: the finished one is exported, the others reported, exit 1.
    mixed = CliRunner().invoke(main, ["export", "-f", "json", str(root / "jfk.flac"),
                                      str(root / "librispeech_1221-135766-0002.wav")])
    assert mixed.exit_code == 1
    assert json.loads(mixed.stdout)["text"] == "my fellow Americans" and "cannot decode audio" in mixed.stderr

    # A folder: what is finished is exported; the rest is reported the same way.
    folder = CliRunner().invoke(main, ["export", "-f", "txt", str(root)])
    assert folder.exit_code == 1 and folder.stdout == "my fellow Americans\n"
    assert "cannot decode audio" in folder.stderr and "still running" in folder.stderr

    # Nothing named: every finished transcript, and no complaint about the others.
    everything = CliRunner().invoke(main, ["export"])
    assert everything.exit_code == 0 and everything.stdout == "my fellow Americans\n"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_export_json_and_transcribe_json_are_one_shape(db_url, tmp_path: Path):
    """`transcribe --json` on a real clip, that transcript stored and exported: the same object,
    but for what only the database knows (the job's id and content hash)."""
    from archive_asr.records import Segment, Timing, Transcript, Word

    clip = tmp_path / "jfk.flac"
    shutil.copy2(SAMPLES / "jfk.flac", clip)
    env = {**os.environ, "ARCHIVE_ASR_MODELS_DIR": str(REPO / ".data" / "test-models")}
    out = subprocess.run([*_archive_asr(), "transcribe", "--json", "--quiet", "--model", "tiny.en", str(clip)],
                         env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert "fellow americans" in printed["text"].lower() and printed["segments"][0]["words"]

    t = printed
    record = Transcript(
        language=t["language"], language_probability=t["language_probability"], duration_s=t["duration_s"],
        text=t["text"], options=t["options"], decoded_s=t["decoded_s"], warnings=tuple(t["warnings"]),
        segments=tuple(Segment(**{**s, "words": tuple(Word(**w) for w in s["words"])}) for s in t["segments"]),
        timing=Timing(**{k: v for k, v in t["timing"].items() if k != "real_time_factor"}),
    )
    assert CliRunner().invoke(main, ["enqueue", "--no-dispatch", "-q", str(clip)]).exit_code == 0
    with session_scope() as s:
        job = s.scalar(select(Job))
        claim_job(session=s, job_id=job.id, worker_host="here", lease_s=60)
        finish_job(session=s, job_id=job.id, transcript=record)
        job_id, sha256 = job.id, job.sha256
    exported = json.loads(CliRunner().invoke(main, ["export", "--format", "json", str(clip)]).stdout)

    assert exported == {**printed, "job_id": job_id, "sha256": sha256}
