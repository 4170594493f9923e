"""Worker fleet numbers on this machine: throughput with 1 vs 2 workers, dispatch overhead, SIGKILL recovery.

    .venv/bin/python benchmarks/bench_workers.py [--jobs 12] [--lease-s 30] [--broker-url redis://...]

Real parts throughout: `archive-asr worker` processes running tiny.en, the scheduler's enqueue,
a SQLite database in a temporary data dir, and the broker given (default: an embedded Valkey).
Clips are the short English ones in ../shared/audio/en, each made unique (a changed last sample)
so the content-hash dedup makes a job of every copy.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from worker.supervisor import stop_gracefully  # noqa: E402

SHARED_AUDIO = REPO.parent / "shared" / "audio"
MODEL = "tiny.en"
CLIPS = (
    "timit_LDC93S1.wav",
    "librivox_sense_and_sensibility_01_austen_64kb-0880.wav",
    "librivox_sense_and_sensibility_01_austen_64kb-0930.wav",
    "librispeech_1221-135766-0002.wav",
    "librivox_sense_and_sensibility_01_austen_64kb-0890.wav",
    "librispeech_1272-128104-0000_leopard.wav",
)


_serial = 0


def unique_clips(dest: Path, n: int, tag: str) -> list[Path]:
    """n WAV files from the short clips, each with its last sample changed (a new sha256, same speech)."""
    global _serial
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        src = SHARED_AUDIO / "en" / CLIPS[i % len(CLIPS)]
        data = bytearray(src.read_bytes())
        _serial += 1
        data[-2:] = _serial.to_bytes(2, "little", signed=True)
        path = dest / f"{tag}-{i:03d}-{src.name}"
        path.write_bytes(bytes(data))
        out.append(path)
    return out


def enqueue(paths: list[Path]) -> tuple[list[int], float]:
    """Write the jobs (scheduler code), then dispatch; return ids and the time.time() of dispatch."""
    from scheduler.enqueue import Enqueuer, job_spec
    from worker.dispatch import dispatch_jobs

    summary = Enqueuer(spec=job_spec(model=MODEL, language=None, word_timestamps=True, priority=0)).run([str(p) for p in paths])
    t = time.time()
    dispatch_jobs(summary.new_jobs)
    return summary.new_jobs, t


def rows(ids: list[int]):
    from sqlalchemy import select

    from models.db import session_scope
    from models.tables import Job

    with session_scope() as session:
        return session.execute(
            select(Job.id, Job.status, Job.started_at, Job.finished_at, Job.worker_host, Job.duration_s).where(Job.id.in_(ids))
        ).all()


def wait_settled(ids: list[int], timeout_s: float = 900) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = rows(ids)
        if all(x.status.value in ("done", "failed") for x in r):
            return r
        time.sleep(0.2)
    raise SystemExit(f"jobs did not finish within {timeout_s} s")


class Worker:
    def __init__(self, env: dict, log: Path):
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--model", MODEL], env=env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self):
        stop_gracefully(self.proc, 60)


def warm_up(workers: list[Worker], tmp: Path, tag: str) -> None:
    """One job per worker so each has loaded its model; the fleet is idle afterwards."""
    ids, _ = enqueue(unique_clips(tmp / tag, len(workers), tag))
    wait_settled(ids)
    time.sleep(1)


def throughput(env: dict, tmp: Path, n_workers: int, n_jobs: int) -> dict:
    workers = [Worker(env, tmp / f"tp{n_workers}-{i}.log") for i in range(n_workers)]
    try:
        warm_up(workers, tmp, f"warm{n_workers}")
        ids, t0 = enqueue(unique_clips(tmp / f"tp{n_workers}", n_jobs, f"tp{n_workers}"))
        r = wait_settled(ids)
        wall_s = max(x.finished_at.timestamp() for x in r) - t0
    finally:
        for w in workers:
            w.stop()
    audio_s = sum(x.duration_s or 0 for x in r)
    return {"workers": n_workers, "jobs": len(ids), "wall_s": wall_s, "jobs_per_min": 60 * len(ids) / wall_s,
            "audio_x_real_time": audio_s / wall_s, "failed": sum(x.status.value == "failed" for x in r)}


def dispatch_overhead(env: dict, tmp: Path, n: int) -> list[float]:
    """Enqueue one job at a time on an idle, warm worker: seconds from dispatch to the worker's claim."""
    worker = Worker(env, tmp / "overhead.log")
    delays = []
    try:
        warm_up([worker], tmp, "warm-overhead")
        for i, clip in enumerate(unique_clips(tmp / "overhead", n, "overhead")):
            [job_id], t0 = enqueue([clip])
            [row] = wait_settled([job_id])
            delays.append(row.started_at.timestamp() - t0)
            time.sleep(0.5)
    finally:
        worker.stop()
    return delays


def recovery(env: dict, tmp: Path, n_jobs: int) -> dict:
    """Two workers; SIGKILL one while it holds jobs; time until another worker has claimed them again."""
    victim, survivor = Worker(env, tmp / "victim.log"), Worker(env, tmp / "survivor.log")
    try:
        warm_up([victim, survivor], tmp, "warm-recovery")
        ids, _ = enqueue(unique_clips(tmp / "recovery", n_jobs, "recovery"))
        tag = f":{victim.proc.pid}"
        while not (held := [x.id for x in rows(ids) if x.status.value == "running" and x.worker_host and tag in x.worker_host]):
            time.sleep(0.1)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        killed = time.time()
        while True:
            r = {x.id: x for x in rows(held)}
            if all(x.worker_host and tag not in x.worker_host for x in r.values()):
                break
            time.sleep(0.1)
        reclaimed_s = max(x.started_at.timestamp() for x in r.values()) - killed
        done = wait_settled(ids)
        all_done_s = max(x.finished_at.timestamp() for x in done) - killed
    finally:
        survivor.stop()
    return {"held": len(held), "reclaimed_s": reclaimed_s, "all_done_s": all_done_s,
            "failed": sum(x.status.value == "failed" for x in done)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=12, help="jobs per throughput run")
    ap.add_argument("--overhead-jobs", type=int, default=8)
    ap.add_argument("--lease-s", type=int, default=30, help="ARCHIVE_ASR_LEASE_S for the recovery run (default: the product's 30)")
    ap.add_argument("--broker-url", default="", help="a Redis URL (default: an embedded Valkey in the temp data dir)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    os.environ.update(
        ARCHIVE_ASR_DATA_DIR=str(tmp / "data"), ARCHIVE_ASR_MODEL=MODEL, ARCHIVE_ASR_LEASE_S=str(args.lease_s),
        ARCHIVE_ASR_MODELS_DIR=os.environ.get("ARCHIVE_ASR_MODELS_DIR", str(REPO / ".data" / "test-models")),
    )
    os.environ.pop("ARCHIVE_ASR_DATABASE_URL", None)
    if args.broker_url:
        os.environ["ARCHIVE_ASR_BROKER_URL"] = args.broker_url
    else:
        os.environ.pop("ARCHIVE_ASR_BROKER_URL", None)
    env = dict(os.environ)
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} at start; model {MODEL} on CPU; lease {args.lease_s} s")
    try:
        delays = dispatch_overhead(env, tmp, args.overhead_jobs)
        print(f"dispatch overhead (dispatch -> claim, idle warm worker, {len(delays)} jobs): "
              f"median {statistics.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms")
        for n in (1, 2):
            t = throughput(env, tmp, n, args.jobs)
            print(f"throughput, {n} worker(s): {t['jobs']} jobs in {t['wall_s']:.1f} s = {t['jobs_per_min']:.1f} jobs/min "
                  f"({t['audio_x_real_time']:.2f}x real time, {t['failed']} failed)")
        rec = recovery(env, tmp, max(6, args.jobs // 2))
        print(f"recovery after SIGKILL (lease {args.lease_s} s): {rec['held']} job(s) held by the killed worker, "
              f"claimed again after {rec['reclaimed_s']:.1f} s, all done {rec['all_done_s']:.1f} s after the kill "
              f"({rec['failed']} failed)")
    finally:
        if not args.broker_url:
            subprocess.run([sys.executable, "-m", "cli", "broker", "stop"], env=env, cwd=REPO, capture_output=True)
        print(f"load average at end {os.getloadavg()[0]:.1f}; logs in {tmp}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
