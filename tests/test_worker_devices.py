"""One worker per device: `--device` pins or refuses clearly, `--per-gpu` supervises one worker per
GPU (one on the CPU on a box with none), and the node name, jobs and `status` say which device."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.fixtures_worker import (
    REPO, SHORT_CLIPS, TEST_MODEL, celery_ready, copy_clips, enqueue, job_rows, wait_for, wait_until_settled, worker_env,
)


def _no_gpu_here() -> bool:
    from engine.device import count_gpus

    return count_gpus() == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["option", "setting"])
def test_a_gpu_this_machine_lacks_is_a_one_line_error(data_dir: Path, how: str):
    if not _no_gpu_here():
        pytest.skip("this machine has a GPU; the message differs (it names how many)")
    env = dict(os.environ, ARCHIVE_ASR_DEVICE="gpu:7") if how == "setting" else dict(os.environ)
    argv = [sys.executable, "-m", "cli", "worker", "--model", TEST_MODEL] + (["--device", "gpu:7"] if how == "option" else [])
    out = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: gpu:7: ") and "--device cpu" in lines[0], out.stderr


def test_device_names_are_checked_and_per_gpu_picks_its_own(data_dir: Path):
    from cli import main
    from engine.device import DeviceChoice, DeviceError, parse_device

    assert parse_device(" GPU:1 ") == DeviceChoice("gpu", 1) and str(parse_device("gpu:12")) == "gpu:12"
    assert parse_device("cpu") == DeviceChoice("cpu") and str(parse_device("auto")) == "auto"
    with pytest.raises(DeviceError, match="gpu:N"):
        parse_device("cuda:1")
    result = CliRunner().invoke(main, ["worker", "--per-gpu", "--device", "gpu:0"])
    assert result.exit_code != 0 and "leave out --device" in result.output
    result = CliRunner().invoke(main, ["worker", "--device", "tpu"])
    assert result.exit_code != 0 and "auto, cpu, gpu or gpu:N" in result.output


def test_the_machine_is_counted_once_for_a_supervisor_and_its_workers(monkeypatch):
    """The count is left in the environment: workers started by `--per-gpu` do not count again."""
    from engine import device

    monkeypatch.setenv(device.COUNT_ENV, "3")
    assert device.count_gpus() == 3  # inherited: no subprocess
    monkeypatch.delenv(device.COUNT_ENV)
    n = device.count_gpus()  # counted in a subprocess
    assert os.environ[device.COUNT_ENV] == str(n)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_per_gpu_on_a_cpu_box_runs_one_cpu_worker_named_for_its_device(shared_audio: Path, tmp_path: Path, monkeypatch):
    if not _no_gpu_here():
        pytest.skip("this machine has a GPU: --per-gpu starts one worker per card")
    env = worker_env(monkeypatch, tmp_path / "data", None)  # SQLite + embedded Valkey
    log_path = tmp_path / "supervisor.log"
    log = open(log_path, "wb")
    supervisor = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--per-gpu", "--model", TEST_MODEL],
                                  env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: celery_ready(log_path.read_text(errors="replace")), 90, "the CPU worker to start")
        text = log_path.read_text(errors="replace")
        assert "0 GPU(s) here: starting 1 worker(s) on cpu (no GPU: one worker on the CPU)" in text
        [node] = set(re.findall(r"(tiny\.en-cpu-\d+)@", text))  # Celery's banner: the node name says the device
        child_pid = int(node.rsplit("-", 1)[1])
        assert child_pid != supervisor.pid  # the worker is a child; the supervisor holds no device
        # the model loads at start-up, before any job: a fleet's first jobs do not wait for it
        wait_for(lambda: f"engine session: model {TEST_MODEL}" in log_path.read_text(errors="replace"), 60,
                 "the model to load with no job queued")
        # its task threads: one per row plus a prefetch of a quarter of the rows (at least 2)
        rows = int(re.search(r"engine session: model \S+, (\d+) rows", log_path.read_text(errors="replace")).group(1))
        threads = int(re.search(r"concurrency: (\d+) \(thread\)", text).group(1))
        assert threads - rows == max(2, rows // 4), (rows, threads)

        enqueue(copy_clips(shared_audio, tmp_path / "audio", SHORT_CLIPS[:1]))
        [row] = wait_until_settled(120)
        assert row.status.value == "done" and row.worker_host == f"{node}@{socket.gethostname()}:{child_pid}"
        status = subprocess.run([sys.executable, "-m", "cli", "status", "--json"], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        [worker] = json.loads(status.stdout)["workers"]
        assert worker["host"] == row.worker_host and worker["device"] == "cpu"

        supervisor.send_signal(signal.SIGTERM)  # passed on: the child shuts down warm, then the supervisor exits
        assert supervisor.wait(timeout=60) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(child_pid, 0)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        log.close()
        subprocess.run([sys.executable, "-m", "cli", "broker", "stop"], env=env, cwd=REPO, timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_second_sigterm_stops_the_workers_at_once(shared_audio: Path, tmp_path: Path, monkeypatch):
    """A warm shutdown finishes the file in hand (here 10 minutes of audio: about two minutes of
    this CPU); asked again, the supervisor kills its worker, and the job waits for its lease to
    lapse instead of running on in an orphaned process (as `archive-asr run` once left one)."""
    if not _no_gpu_here():
        pytest.skip("this machine has a GPU: the worker would finish the file in seconds")
    env = worker_env(monkeypatch, tmp_path / "data", None)
    log_path = tmp_path / "supervisor.log"
    with open(log_path, "wb") as log:
        supervisor = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--per-gpu", "--model", TEST_MODEL],
                                      env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        def started() -> bool:  # the model loads while Celery boots: either may come first
            text = log_path.read_text(errors="replace")
            return f"engine session: model {TEST_MODEL}" in text and celery_ready(text)

        wait_for(started, 90, "the worker to load its model and start consuming")
        child_pid = int(re.search(r"tiny\.en-cpu-(\d+)@", log_path.read_text(errors="replace")).group(1))
        [job_id] = enqueue(copy_clips(shared_audio, tmp_path / "audio", ("longform/english_read_mix_concat.flac",)))
        wait_for(lambda: job_rows()[0].status.value == "running", 60, "the long file's job to start")
        supervisor.send_signal(signal.SIGTERM)  # warm: the worker would finish the file first
        with pytest.raises(subprocess.TimeoutExpired):
            supervisor.wait(timeout=3)
        supervisor.send_signal(signal.SIGTERM)  # again: now
        supervisor.wait(timeout=15)
        with pytest.raises(ProcessLookupError):
            os.kill(child_pid, 0)
        [row] = job_rows()
        assert row.id == job_id and row.status.value == "running" and row.transcripts == 0  # its lease brings it back
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        subprocess.run([sys.executable, "-m", "cli", "broker", "stop"], env=env, cwd=REPO, timeout=60)
