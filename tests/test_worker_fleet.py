"""Two real workers on the SQLite default and the embedded broker, watched by Flower.

No "database is locked" failures (WAL + busy timeout), and Flower's API shows both workers and
each task with its file and audio duration.
"""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_worker import (
    REPO,
    SHORT_CLIPS,
    copy_clips,
    enqueue,
    wait_for,
    wait_until_settled,
    worker_env,
    workers,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
AUTH = ("archivist", "s3cret-for-tests")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_on_sqlite_with_flower(shared_audio: Path, tmp_path: Path, monkeypatch):
    import requests

    env = worker_env(monkeypatch, tmp_path / "data", None)  # SQLite file + embedded Valkey
    port = _free_port()
    flower_log = open(tmp_path / "flower.log", "wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "cli", "flower", "--port", str(port), "--basic-auth", ":".join(AUTH)],
        env=env, cwd=REPO, stdout=flower_log, stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        with workers(env, tmp_path, 2) as procs:

            def both_workers_listed():
                try:
                    r = requests.get(f"{api}/workers", params={"refresh": 1}, auth=AUTH, timeout=10)
                except requests.ConnectionError:
                    return None
                return r.json() if r.ok and len(r.json()) == 2 else None

            listed = wait_for(both_workers_listed, 90, "Flower to list both workers", poll_s=1)
            assert all(name.startswith("tiny.en-") for name in listed)
            assert requests.get(f"{api}/workers", timeout=10).status_code == 401  # no anonymous access

            clips = copy_clips(shared_audio, tmp_path / "audio", SHORT_CLIPS)
            broken = tmp_path / "audio" / "broken.wav"
            broken.write_text("not audio: an archivist's note saved with the wrong name\n" * 20)
            ids = enqueue([*clips, broken])
            rows = wait_until_settled(240, procs)
            logs = "".join(p.log() for p in procs)

            def tasks_done():
                tasks = requests.get(f"{api}/tasks", auth=AUTH, timeout=10).json()
                ended = [t for t in tasks.values() if t["state"] in ("SUCCESS", "FAILURE")]
                return tasks if len(ended) >= len(ids) else None

            tasks = wait_for(tasks_done, 30, "Flower to record every task", poll_s=1)
    finally:
        flower.terminate()
        flower.wait(timeout=30)
        subprocess.run([sys.executable, "-m", "cli", "broker", "stop"], env=env, cwd=REPO, timeout=60)

    assert len(ids) == len(SHORT_CLIPS) + 1
    good = [r for r in rows if not r.path.endswith("broken.wav")]
    assert all(r.status.value == "done" and r.transcripts == 1 for r in good), [(r.path, r.error) for r in rows]
    # SQLite's lock never shows while jobs run (two workers starting together may wait on the
    # migration lock once: "retrying in 1 s (Ctrl-C to stop)" is that start-up wait, not a job's)
    assert not [line for line in logs.splitlines() if "database is locked" in line and "(Ctrl-C to stop)" not in line]
    names = {Path(p).name for p in SHORT_CLIPS} | {"broken.wav"}
    shown = {Path(t["kwargs"] and ast.literal_eval(t["kwargs"])["path"]).name for t in tasks.values()}  # Flower reprs kwargs
    assert shown == names  # every task names its file
    [failed] = [t for t in tasks.values() if t["state"] == "FAILURE"]  # the broken file's task, and only it
    assert "broken.wav" in failed["kwargs"] and "not an audio file" in failed["exception"]
    workers_seen = {t["worker"] for t in tasks.values()}
    assert len(workers_seen) == 2, workers_seen  # both workers took messages
    reports = [ast.literal_eval(t["result"]) for t in tasks.values() if t["result"] and "audio_s" in t["result"]]
    transcribed = [r for r in reports if r["audio_s"] > 0]
    assert len(transcribed) == len(ids) - 1  # every transcribed job its own task, with its own result
    for r in transcribed:
        assert list(r)[:2] == ["file", "status"] and r["status"] == "done"  # the summary first
        assert r["wall_s"] > 0 and r["x_real_time"] > 0 and r["batch_size"] >= 1 and r["device"] == "cpu"
