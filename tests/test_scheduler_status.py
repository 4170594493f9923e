"""`archive-asr status`: throughput and ETA over the time actually worked, worker rows, --json = text."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import select, update

from cli import main
from models.base import utcnow
from models.db import session_scope
from models.jobs import claim_job, finish_job
from models.tables import Job
from scheduler.status import worked_s
from tests.fixtures_db import db_url, make_transcript  # noqa: F401

SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "samples"


def _status() -> tuple[dict, str]:
    runner = CliRunner()
    as_json = runner.invoke(main, ["status", "--json"])
    text = runner.invoke(main, ["status"])
    assert as_json.exit_code == 0 and text.exit_code == 0, as_json.output + text.output
    return json.loads(as_json.stdout), text.stdout


def test_worked_time_is_the_union_of_the_intervals():
    t0 = utcnow()
    s = lambda a, b: (t0 + timedelta(seconds=a), t0 + timedelta(seconds=b))  # noqa: E731
    assert worked_s([]) == 0
    assert worked_s([s(0, 10), s(5, 12), s(30, 40)]) == 22  # overlap once, the gap not at all
    assert worked_s([s(30, 40), s(0, 100)]) == 100


def test_a_queue_started_minutes_ago_gets_an_eta_at_the_rate_it_ran(db_url, tmp_path: Path):
    """Two jobs finished in the 65 s since the queue started; the ETA is the audio left at that rate,
    not the audio left at 'what finished in the last hour per hour' (which made it ~55x too long)."""
    root = tmp_path / "archive"
    shutil.copytree(SAMPLES, root)
    assert CliRunner().invoke(main, ["enqueue", "--no-dispatch", "-q", str(root)]).exit_code == 0
    with session_scope() as s:
        jobs = {Path(j.path).name: j for j in s.scalars(select(Job))}
        left_s = jobs["librispeech_1221-135766-0002.wav"].duration_s
    now = utcnow()
    # mac-mini-1 (cpu): jfk, 11 s of audio, worked from 65 s ago to 45 s ago.
    # linux-gpu: a 6 s clip from 50 s ago to 5 s ago. Together: busy 60 s (65 s ago .. 5 s ago).
    plan = [("jfk.flac", "mac-mini-1", "cpu", 65, 45, [(0.0, 11.0, "my fellow Americans")], 0.5),
            ("librispeech_61-70968-0000.flac", "linux-gpu", "gpu (NVIDIA H100)", 50, 5, [(0.0, 6.0, "hello there")], 0.05)]
    with session_scope() as s:
        for name, host, device, started_ago, finished_ago, sentences, wall_s in plan:
            job_id = jobs[name].id
            claim_job(session=s, job_id=job_id, worker_host=host, lease_s=60)
            t = make_transcript(sentences, wall_s=wall_s)
            t = replace(t, timing=replace(t.timing, device=device))
            finish_job(session=s, job_id=job_id, transcript=t)
            s.execute(update(Job).where(Job.id == job_id).values(
                started_at=now - timedelta(seconds=started_ago), finished_at=now - timedelta(seconds=finished_ago)))

    report, text = _status()
    assert report["done_last_hour"] == 2 and report["audio_s_last_hour"] == 17.0
    assert abs(report["worked_s_last_hour"] - 60) < 1
    rate = 17.0 / 60  # audio seconds per second worked = audio hours per hour
    assert abs(report["audio_hours_per_hour"] - rate) < 0.01
    assert abs(report["eta_s"] - left_s / rate) < 0.5  # ~17 s, where the old arithmetic said ~17 minutes
    assert "ETA 0m17s" in text and "0.28 h of audio per hour" in text

    hosts = {w["host"]: w for w in report["workers"]}
    assert hosts["mac-mini-1"]["device"] == "cpu" and hosts["linux-gpu"]["device"] == "gpu (NVIDIA H100)"
    assert abs(hosts["mac-mini-1"]["audio_hours_per_hour"] - 11 / 20) < 0.01
    assert abs(hosts["linux-gpu"]["audio_hours_per_hour"] - 6 / 45) < 0.01
    # The engine's real-time factor, with the precision it deserves (22x and 120x, not rounded to 0x or 1x).
    assert hosts["mac-mini-1"]["mean_real_time_factor"] == 22.0
    mac = next(line for line in text.splitlines() if "mac-mini-1" in line)
    gpu = next(line for line in text.splitlines() if "linux-gpu" in line)
    assert "(cpu)" in mac and "0.55 h of audio per hour" in mac and "22.0x real time" in mac
    assert "(gpu (NVIDIA H100))" in gpu and "0.13 h of audio per hour" in gpu and "120x real time" in gpu


def test_slow_engine_shows_its_fraction_and_nothing_finished_means_no_rate(db_url, tmp_path: Path):
    root = tmp_path / "archive"
    shutil.copytree(SAMPLES, root)
    assert CliRunner().invoke(main, ["enqueue", "--no-dispatch", "-q", str(root / "jfk.flac")]).exit_code == 0
    report, text = _status()
    assert report["audio_hours_per_hour"] is None and report["eta_s"] is None
    assert "no job finished" in text and "ETA unknown until jobs finish" in text
    with session_scope() as s:
        job_id = s.scalar(select(Job.id))
        claim_job(session=s, job_id=job_id, worker_host="old-laptop", lease_s=60)
        finish_job(session=s, job_id=job_id, transcript=make_transcript([(0.0, 11.0, "my fellow Americans")], wall_s=25.0))
    report, text = _status()
    assert report["workers"][0]["mean_real_time_factor"] == 0.44
    assert "0.44x real time" in text


def test_each_worker_row_says_which_device_it_holds(db_url, tmp_path: Path):
    """Two workers on one box, one per GPU: their rows say gpu:0 and gpu:1, the card's name once known."""
    root = tmp_path / "archive"
    shutil.copytree(SAMPLES, root)
    assert CliRunner().invoke(main, ["enqueue", "--no-dispatch", "-q", str(root)]).exit_code == 0
    gpu0, gpu1, mac = "base-gpu0-4343@linux-gpu:4343", "base-gpu1-4242@linux-gpu:4242", "tiny.en-cpu-77@mac-mini-1:77"
    with session_scope() as s:
        first, second, third = s.scalars(select(Job.id).order_by(Job.id)).all()[:3]
        claim_job(session=s, job_id=first, worker_host=gpu1, lease_s=60)
        t = make_transcript([(0.0, 11.0, "my fellow Americans")], wall_s=0.1)
        finish_job(session=s, job_id=first, transcript=replace(t, timing=replace(t.timing, device="gpu (NVIDIA H100 80GB HBM3)")))
        claim_job(session=s, job_id=second, worker_host=gpu0, lease_s=60)  # running, nothing finished yet
        claim_job(session=s, job_id=third, worker_host=mac, lease_s=60)
        finish_job(session=s, job_id=third, transcript=make_transcript([(0.0, 3.0, "hello")], wall_s=0.5))
    report, text = _status()
    devices = {w["host"]: w["device"] for w in report["workers"]}
    assert devices == {gpu0: "gpu:0", gpu1: "gpu:1 (NVIDIA H100 80GB HBM3)", mac: "cpu"}
    assert "gpu:1 (NVIDIA H100 80GB HBM3)" in next(line for line in text.splitlines() if gpu1 in line)
