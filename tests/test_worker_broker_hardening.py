"""The embedded broker under a clumsy user and a hostile machine: odd data folders, a stopped or
disk-full server (never a twin), private files, and Flower locked without a password."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.fixtures_worker import REPO, SHORT_CLIPS, celery_ready, copy_clips, wait_for

pytestmark = pytest.mark.timeout(120)

ODD_NAME = "Application Support/é \"quoted\" 'x'/archive-asr"  # macOS's default, plus quotes and accents


def cli(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def status(env: dict) -> dict:
    out = cli(env, "broker", "status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def environment(data_dir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHIVE_ASR_", "FLOWER_"))}
    env.update(ARCHIVE_ASR_DATA_DIR=str(data_dir), ARCHIVE_ASR_MODEL="tiny.en",
               ARCHIVE_ASR_MODELS_DIR=str(REPO / ".data" / "test-models"), **extra)
    return env


def valkeys_in(broker_dir: Path) -> list[int]:
    """Every live Valkey server working in this folder (Linux: by /proc cwd)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"valkey-server" not in (proc / "cmdline").read_bytes():
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if Path(os.readlink(proc / "cwd")) == broker_dir.resolve():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def odd_env(tmp_path: Path):
    data = tmp_path / ODD_NAME
    env = environment(data)
    yield env
    cli(env, "broker", "stop")  # never leave a server behind


needs_proc = pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="counts servers through /proc (Linux)")


@needs_proc
def test_broker_and_enqueue_in_a_data_folder_with_spaces_quotes_and_accents(odd_env, tmp_path, shared_audio):
    data = Path(odd_env["ARCHIVE_ASR_DATA_DIR"])
    out = cli(odd_env, "broker", "start")
    assert out.returncode == 0, out.stderr
    assert "embedded Valkey running" in out.stdout
    st = status(odd_env)
    assert st["running"] is True and st["data_dir"] == str(data / "broker")
    assert valkeys_in(data / "broker") == [st["pid"]]

    # Private by default: a new data folder is 0700, everything Valkey writes 0600.
    assert oct(data.stat().st_mode & 0o777) == "0o700"
    assert oct((data / "broker").stat().st_mode & 0o777) == "0o700"
    written = [p for p in (data / "broker").rglob("*") if p.is_file()]
    assert any(p.parent.name == "appendonlydir" for p in written)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o600" for p in written}

    recordings = tmp_path / "my recordings"
    copy_clips(shared_audio, recordings, SHORT_CLIPS[:2])
    out = cli(odd_env, "enqueue", str(recordings), "--quiet")
    assert out.returncode == 0, out.stdout + out.stderr
    assert status(odd_env)["queues"] == {"asr.tiny.en": 2}  # dispatched to the broker in the odd folder
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in data.glob("archive*")} == {
        p.name: "0o600" for p in data.glob("archive*")}  # the database, its WAL and its lock

    out = cli(odd_env, "broker", "stop")
    assert out.returncode == 0 and f"stopped (pid {st['pid']})" in out.stdout
    assert gone(st["pid"]) and status(odd_env)["running"] is False
    # Waiting messages survive in the odd folder's AOF.
    assert cli(odd_env, "broker", "start").returncode == 0
    assert status(odd_env)["queues"] == {"asr.tiny.en": 2}


@needs_proc
def test_a_stopped_broker_gets_no_twin_and_broker_stop_stops_it(data_dir: Path, tmp_path: Path, shared_audio):
    env = environment(data_dir, ARCHIVE_ASR_LEASE_S="6")  # a short lease: a short reconciler grace period
    try:
        assert cli(env, "broker", "start").returncode == 0
        before = status(env)
        pid = before["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            st = status(env)
            assert st["running"] is False and st["state"] == "stopped" and st["pid"] == pid
            assert f"kill -CONT {pid}" in st["reason"]

            # A command that needs the broker says why it can't have it, and starts no second server.
            code = "from worker.broker import ensure_embedded; ensure_embedded()"
            out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode != 0 and "is alive but" in out.stderr and "stopped" in out.stderr
            recordings = tmp_path / "recordings"
            copy_clips(shared_audio, recordings, SHORT_CLIPS[:1])
            out = cli(env, "enqueue", str(recordings))
            assert out.returncode == 0, out.stdout + out.stderr  # the job is safe in the database
            assert "stopped" in out.stderr
            assert valkeys_in(data_dir / "broker") == [pid]
            assert json.loads((data_dir / "broker" / "broker.json").read_text())["port"] == before["port"]

            # `broker stop` stops whatever holds the folder, stopped or not.
            out = cli(env, "broker", "stop")
            assert out.returncode == 0 and f"stopped (pid {pid})" in out.stdout, out.stdout + out.stderr
            assert gone(pid) and valkeys_in(data_dir / "broker") == []
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        # The next start serves the folder again; the job's message is re-sent by the reconciler.
        assert cli(env, "broker", "start").returncode == 0

        def redispatched() -> list[int]:  # once the job is older than the reconciler's grace period
            out = cli(env, "reconcile", "--json")
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)["redispatched"]

        assert len(wait_for(redispatched, 40, "the reconciler to re-send the job", poll_s=1)) == 1
        assert status(env)["queues"] == {"asr.tiny.en": 1}
    finally:
        cli(env, "broker", "stop")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs to fill up (needs root; skipped elsewhere)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("filling a disk needs a tmpfs mount (root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@needs_proc
def test_a_full_disk_is_named_and_its_broker_gets_no_twin(small_disk: Path):
    env = environment(small_disk / "data")
    try:
        assert cli(env, "broker", "start").returncode == 0
        st = status(env)
        pid = st["pid"]
        with open(small_disk / "filler", "wb") as f:  # leave ~100 KiB
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            f.write(b"\0" * max(free - 100_000, 0))
        r = redis.Redis.from_url(json_url(small_disk / "data"))
        with pytest.raises(redis.ResponseError):
            for i in range(100):
                r.lpush("asr.tiny.en", b"x" * 50_000)
                time.sleep(0.02)  # the AOF is written every second
            time.sleep(2)
            r.ping()
        st = status(env)
        assert st["running"] is False and st["state"] == "disk full" and st["pid"] == pid, st
        code = "from worker.broker import ensure_embedded; ensure_embedded()"
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "disk" in out.stderr and "full" in out.stderr, out.stderr
        assert valkeys_in(small_disk / "data" / "broker") == [pid]  # no twin

        # The database on that disk: "disk full", not SQLite's "disk I/O error".
        out = cli(env, "status")
        assert out.returncode != 0 and "disk full" in out.stderr and "Traceback" not in out.stderr, out.stderr

        out = cli(env, "broker", "stop")
        assert out.returncode == 0 and f"stopped (pid {pid})" in out.stdout, out.stdout + out.stderr
        assert gone(pid)
    finally:
        cli(env, "broker", "stop")


def json_url(data_dir: Path) -> str:
    state = json.loads((data_dir / "broker" / "broker.json").read_text())
    return f"redis://:{state['password']}@127.0.0.1:{state['port']}/0"


@needs_proc
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_jobs_enqueued_while_the_broker_is_stopped_finish_once_it_resumes(data_dir, tmp_path, shared_audio, monkeypatch):
    from tests.fixtures_worker import wait_until_settled, worker_env, workers

    env = worker_env(monkeypatch, data_dir, None)  # SQLite, the embedded broker, 6 s leases
    assert cli(env, "broker", "start").returncode == 0
    pid = status(env)["pid"]
    recordings = tmp_path / "recordings"
    copy_clips(shared_audio, recordings, SHORT_CLIPS[:2])
    try:
        with workers(env, tmp_path, 1) as procs:
            wait_for(lambda: celery_ready(procs[0].log()), 90, "the worker to start")
            os.kill(pid, signal.SIGSTOP)
            try:
                out = cli(env, "enqueue", str(recordings))
                assert out.returncode == 0, out.stdout + out.stderr
                assert valkeys_in(data_dir / "broker") == [pid]  # no twin beside the idle worker
                time.sleep(2)
            finally:
                os.kill(pid, signal.SIGCONT)
            rows = wait_until_settled(180, procs)
        assert [(r.status.value, r.transcripts) for r in rows] == [("done", 1), ("done", 1)]
        assert valkeys_in(data_dir / "broker") == [pid]
    finally:
        cli(env, "broker", "stop")


# --- Flower ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("credentials", ["admin:", ":", ":secret", "admin", "admin:secret,guest:", " :secret"])
def test_flower_refuses_empty_user_names_and_passwords(data_dir: Path, monkeypatch, credentials: str):
    from click.testing import CliRunner

    from archive_asr.errors import ConfigError
    from archive_asr.settings import get_settings
    from cli import main

    result = CliRunner().invoke(main, ["flower", "--address", "0.0.0.0", "--basic-auth", credentials])
    assert result.exit_code != 0 and "non-empty user name and password" in result.output, result.output

    monkeypatch.setenv("ARCHIVE_ASR_FLOWER_BASIC_AUTH", credentials)
    get_settings.cache_clear()
    with pytest.raises(ConfigError, match="ARCHIVE_ASR_FLOWER_BASIC_AUTH"):
        get_settings()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_flower_without_a_password_cannot_stop_a_worker(data_dir: Path, tmp_path: Path, monkeypatch):
    import requests

    from tests.fixtures_worker import worker_env, workers

    env = worker_env(monkeypatch, data_dir, None)
    env["FLOWER_UNAUTHENTICATED_API"] = "true"  # inherited from somewhere: must not open the API
    port = _free_port()
    flower_log = open(tmp_path / "flower.log", "wb")
    flower = subprocess.Popen([sys.executable, "-m", "cli", "flower", "--port", str(port)], env=env, cwd=REPO,
                              stdout=flower_log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with workers(env, tmp_path, 1) as procs:
            wait_for(lambda: celery_ready(procs[0].log()), 90, "the worker to start")

            def dashboard():
                try:
                    return requests.get(f"{base}/workers", timeout=5).status_code == 200
                except requests.ConnectionError:
                    return False

            wait_for(dashboard, 60, "Flower to serve its dashboard", poll_s=0.5)
            name = f"tiny.en-cpu-{procs[0].pid}@{socket.gethostname()}"
            shutdown = requests.post(f"{base}/api/worker/shutdown/{name}", timeout=10)
            assert shutdown.status_code == 401
            assert requests.get(f"{base}/api/workers", timeout=10).status_code == 401  # the API is off
            assert requests.post(f"{base}/api/task/revoke/x", timeout=10).status_code == 401
            time.sleep(3)
            assert procs[0].proc.poll() is None  # the worker still runs
            assert "shutdown" not in procs[0].log().lower().split("ready", 1)[1]
    finally:
        flower.terminate()
        flower.wait(timeout=30)
        flower_log.close()
        cli(env, "broker", "stop")
    banner = (tmp_path / "flower.log").read_text()
    assert "read-only" in banner and "ARCHIVE_ASR_FLOWER_BASIC_AUTH" in banner


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_in_a_data_folder_with_spaces_quotes_and_accents(odd_env, tmp_path, shared_audio):
    import sqlite3

    recordings = tmp_path / "my recordings"
    copy_clips(shared_audio, recordings, ("jfk.flac",))
    out = cli(odd_env, "run", str(recordings), "--model", "tiny.en", "--quiet", timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "done: 1, failed: 0" in out.stdout
    db = Path(odd_env["ARCHIVE_ASR_DATA_DIR"]) / "archive.db"
    (text,) = sqlite3.connect(db).execute("SELECT text FROM transcripts").fetchone()
    assert "fellow americans" in text.lower()
