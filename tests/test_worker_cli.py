"""The queue's CLI: `archive-asr run` end to end, and the guards on `flower` and `worker`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.fixtures_worker import REPO, SHORT_CLIPS, copy_clips, worker_env


def test_flower_refuses_the_network_without_a_password(data_dir: Path):
    from cli import main

    result = CliRunner().invoke(main, ["flower", "--address", "0.0.0.0"])
    assert result.exit_code != 0
    assert "without a password" in result.output and "ARCHIVE_ASR_FLOWER_BASIC_AUTH" in result.output
    result = CliRunner().invoke(main, ["flower", "--address", "0.0.0.0", "--basic-auth", "nocolon"])
    assert result.exit_code != 0 and "user:password" in result.output


def test_worker_options_for_this_platform():
    from worker.commands import is_loopback, worker_argv

    argv = worker_argv(model="tiny.en", concurrency=1, loglevel="INFO", device_tag="cpu")
    assert argv[argv.index("-Q") + 1] == "asr.tiny.en"  # its model's queue only
    assert argv[argv.index("-n") + 1] == f"tiny.en-cpu-{os.getpid()}@%h"  # Flower's name says the device
    assert "-E" in argv and "--pool=threads" in argv and "--concurrency=1" in argv
    several = worker_argv(model="base", concurrency=66, loglevel="INFO", device_tag="gpu1")  # 64 rows + a prefetch of 2
    assert several[several.index("-n") + 1].startswith("base-gpu1-")
    assert "--pool=threads" in several and "--concurrency=66" in several  # one session, never forks
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20")


def test_worker_rejects_a_bad_batch_size(data_dir: Path):
    from cli import main

    result = CliRunner().invoke(main, ["worker", "--batch-size", "lots"])
    assert result.exit_code != 0 and "'auto' or a positive number" in result.output


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_run_transcribes_a_folder_then_exits_nonzero_naming_the_failed_file(shared_audio: Path, tmp_path: Path, monkeypatch):
    env = worker_env(monkeypatch, tmp_path / "data", None)  # embedded defaults: SQLite, Valkey
    folder = tmp_path / "recordings"
    copy_clips(shared_audio, folder, SHORT_CLIPS[:2] + ("jfk.flac",))
    (folder / "broken.wav").write_text("not audio")

    def run(*paths: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli", "run", *map(str, paths), "--quiet", "--batch-size", "2"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=280)

    def broker_running() -> bool:
        out = subprocess.run([sys.executable, "-m", "cli", "broker", "status", "--json"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout)["running"]

    try:
        out = run(folder)
        assert out.returncode == 1, out.stdout + out.stderr  # a job it ran failed
        assert "done: 3, failed: 1" in out.stdout
        failed = [line for line in out.stderr.splitlines() if line.strip().startswith("failed:")]
        assert len(failed) == 1 and "broken.wav" in failed[0]  # which, and why:
        assert len(failed[0].split("broken.wav: ", 1)[1]) > 5
        # It started the embedded broker itself, so it stopped it once its jobs were done.
        assert "started the embedded Valkey broker" in out.stderr and "stopped the embedded broker" in out.stderr
        assert not broker_running()
        db = tmp_path / "data" / "archive.db"
        assert f"results: sqlite:///{db}" in out.stdout
        query = out.stdout.split("query:", 1)[1].strip().splitlines()[0]
        assert query.startswith(f"sqlite3 '{db}'")
        sql = query.split('"', 1)[1].rsplit('"', 1)[0]
        rows = sqlite3.connect(db).execute(sql).fetchall()  # the printed query works and finds the transcripts
        assert len(rows) == 3
        assert {n for (n,) in sqlite3.connect(db).execute("SELECT batch_size FROM transcripts")} == {2}  # --batch-size reached the engine
        jfk = next(r for r in rows if r[0].endswith("jfk.flac"))
        assert "ask not what your country" in jfk[4].lower() or "fellow americans" in jfk[4].lower()
        assert "x_real_time" in out.stdout and "country" in out.stdout  # and its result is printed

        # Again on one finished file: nothing to transcribe, exit 0, and the results are that file's only.
        again = run(folder / "jfk.flac")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "done: 1, failed: 0" in again.stdout
        sql = again.stdout.split("query:", 1)[1].strip().splitlines()[0].split('"', 1)[1].rsplit('"', 1)[0]
        assert [r[0] for r in sqlite3.connect(db).execute(sql)] == [str(folder / "jfk.flac")]
        # The failed file, run again, is reported again (failed in an earlier run) and exits 1.
        broken = run(folder / "broken.wav")
        assert broken.returncode == 1 and "failed before this run" in broken.stderr
    finally:
        subprocess.run([sys.executable, "-m", "cli", "broker", "stop"], env=env, cwd=REPO, timeout=60)


@pytest.mark.timeout(120)
def test_worker_waits_for_an_unreachable_database_and_says_so(data_dir: Path, tmp_path: Path):
    import os
    import signal
    import time

    env = dict(os.environ, ARCHIVE_ASR_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
               ARCHIVE_ASR_BROKER_URL="redis://127.0.0.1:1/0")
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        # Ctrl-C as a terminal delivers it: a suite started in the background (`nohup make test &`)
        # passes SIGINT on ignored, and a worker that ignores it waits on (seen: 30 s, then failed)
        proc = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--model", "tiny.en"],
                                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and log.read_text().count("database unavailable") < 2:
                time.sleep(0.5)
            assert proc.poll() is None  # still waiting, not crashed
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(f"the worker did not stop on Ctrl-C; its output:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert text.count("database unavailable") >= 2 and "retrying in 2 s" in text
    assert "127.0.0.1:1" in text and "Traceback" not in text
