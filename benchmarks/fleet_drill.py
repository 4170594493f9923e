"""Fleet drill: real PostgreSQL, the embedded Valkey with its password, one worker per GPU, failures.

Phases (each on a fresh PostgreSQL database, the same archive, the real CLI in subprocesses):
  build   the archive (benchmarks/build_archive.py; --small: a few dozen short clips, each unique)
  warmup  tp2 once, not measured: a fresh GPU machine compiles MLX's CUDA kernels on first use
  tp1     one worker (the first device): enqueue, wait until every job is done; wall time, hours/hour
  tp2     two workers (`worker --per-gpu` on a GPU box, two `--device cpu` with --small), the same,
          with `archive-asr status --json` and Flower's API (/api/workers, /api/tasks) read mid-run
          (--repeat N: tp1 and tp2 alternate N times, tp1, tp2, tp1-2, tp2-2, ...: one pair's ratio
          is one sample; a single pair on two H200s gave 2.16x on one machine and 1.85x on another)
  kill    two workers; SIGKILL one while it holds jobs: how long until its jobs are re-queued and
          claimed by the other (target: the lease + 10 s), then every job done exactly once
  broker  two workers; SIGKILL the Valkey server mid-run, start it again: every job done, none twice

    # on the 2 x H100 machine (PYTHONPATH=/tmp/site:$PWD), one call:
    python3 benchmarks/fleet_drill.py --work /tmp/fleet --out $OUT \\
        --audio-root /tmp/stage/x/extra/audio --models-dir /tmp/stage/x/extra/models
    # here, on the CPU, a small rehearsal of every phase (tiny.en, short clips, two CPU workers):
    .venv/bin/python benchmarks/fleet_drill.py --small --work /tmp/fleet-small --out /tmp/fleet-small/out

State lives in --work (the archive, PostgreSQL's data, each finished phase's JSON), so a second
call with `--phases kill,broker` continues where a first one stopped; phases that would start after
--budget-s are left for the next call (the script says which). Results: --out/fleet_drill.json and
fleet_drill.md (every phase found in --work), plus the workers' logs.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from worker.supervisor import stop_gracefully  # noqa: E402

# warmup: one pass with both workers, not measured. A fresh GPU machine compiles MLX's CUDA kernels
# on their first use (cached on disk after): the first pass on an H100 ran 28 rounds in 105 s of
# device time where a warm one takes ~19 s, and would count that against whichever phase ran first.
PHASES = ("build", "warmup", "tp1", "tp2", "kill", "broker")
FLOWER_AUTH = ("drill", "drill-flower-password")
SMALL_CLIPS = (  # 3-17 s English clips of ../shared/audio/en
    "jfk.flac", "librispeech_1089-134686-0001.wav", "librispeech_1221-135766-0001.wav",
    "librispeech_1221-135766-0002.wav", "librispeech_1995-1837-0001.wav", "librispeech_2412-153948-0000.flac",
    "librispeech_61-70968-0000.flac", "librivox_sense_and_sensibility_01_austen_64kb-0870.wav",
    "librivox_sense_and_sensibility_01_austen_64kb-0880.wav", "librivox_sense_and_sensibility_01_austen_64kb-0890.wav",
    "librivox_sense_and_sensibility_01_austen_64kb-0930.wav", "timit_LDC93S1.wav",
)
POLL_S = 0.25


@dataclass
class Drill:
    work: Path
    out: Path
    model: str
    devices: tuple[str, str]  # the two workers' devices; tp1 uses the first
    per_gpu: bool  # tp2 starts `worker --per-gpu` (a GPU box) rather than two `--device` workers
    lease_s: int
    models_dir: Path
    blas_threads: int | None  # CPU workers' OPENBLAS_NUM_THREADS: 0 = cores / workers, None = unset
    deadline: float  # time.monotonic() after which no phase starts and waits give up
    batch_size: int = 0  # ARCHIVE_ASR_BATCH_SIZE for every worker; 0: each plans its own
    worker_env: dict = field(default_factory=dict)  # more ARCHIVE_ASR_* settings for every worker (--worker-env)
    server: object = None  # pgserver's PostgresServer, or None with --database-url
    base_url: str = ""
    logs: list[Path] = field(default_factory=list)

    @property
    def archive(self) -> Path:
        return self.work / "archive"

    @property
    def data_dir(self) -> Path:
        return self.work / "data"  # the embedded Valkey, the workers' spool and logs

    def left_s(self) -> float:
        return self.deadline - time.monotonic()


# --- services ---------------------------------------------------------------------------------------


def start_postgres(d: Drill, database_url: str | None) -> None:
    """pgserver's PostgreSQL in --work/pgdata (a unix socket there; as root it runs as user pgserver)."""
    if database_url:
        d.base_url = database_url
        return
    import pgserver

    pgdata = d.work / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    try:
        d.server = pgserver.get_server(pgdata, cleanup_mode="stop")  # stopped when this script exits
    except Exception as e:
        raise SystemExit(f"pgserver could not start PostgreSQL in {pgdata} ({type(e).__name__}: {e}); "
                         f"see {pgdata / 'log'}, or pass --database-url of a running server") from e
    d.base_url = d.server.get_uri()


def fresh_database(d: Drill, name: str) -> str:
    """CREATE DATABASE name (dropped first if an earlier call left it); its postgresql:// URL."""
    import psycopg

    with psycopg.connect(d.base_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    head, sep, query = d.base_url.partition("?")
    return re.sub(r"/[^/]*$", f"/{name}", head) + sep + query


def env_for(d: Drill, db_url: str, *, threads: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHIVE_ASR_", "FLOWER_"))}
    env.update(
        ARCHIVE_ASR_DATABASE_URL=db_url, ARCHIVE_ASR_DATA_DIR=str(d.data_dir), ARCHIVE_ASR_MODELS_DIR=str(d.models_dir),
        ARCHIVE_ASR_MODEL=d.model, ARCHIVE_ASR_LEASE_S=str(d.lease_s), ARCHIVE_ASR_FLOWER_BASIC_AUTH=":".join(FLOWER_AUTH),
        PYTHONUNBUFFERED="1",
    )  # no ARCHIVE_ASR_BROKER_URL: the embedded Valkey, password-protected, in the data dir
    if threads:
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    if d.batch_size:
        env["ARCHIVE_ASR_BATCH_SIZE"] = str(d.batch_size)
    env.update(d.worker_env)
    return env


def cli(env: dict, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)


def broker_state(env: dict) -> dict:
    out = cli(env, "broker", "status", "--json")
    return json.loads(out.stdout)


def empty_broker(env: dict) -> dict:
    """Start the embedded Valkey if needed and empty it (messages of an earlier phase name other jobs)."""
    started = cli(env, "broker", "start")
    if started.returncode != 0:
        raise SystemExit(f"broker start failed: {started.stderr.strip()}")
    state = json.loads((Path(broker_state(env)["data_dir"]) / "broker.json").read_text())
    import redis

    r = redis.Redis(host="127.0.0.1", port=state["port"], password=state["password"])
    r.flushdb()
    try:
        redis.Redis(host="127.0.0.1", port=state["port"]).ping()
        anonymous = "answers without a password"
    except redis.AuthenticationError:
        anonymous = "refused without a password"
    except redis.RedisError as e:
        anonymous = f"refused without a password ({type(e).__name__})"
    return {"port": state["port"], "password_length": len(state["password"]), "anonymous_ping": anonymous}


# --- workers ----------------------------------------------------------------------------------------


class Worker:
    """A real `archive-asr worker` (or `--per-gpu` supervisor) process, its output in a log."""

    def __init__(self, d: Drill, env: dict, name: str, *args: str):
        self.log_path = d.work / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        d.logs.append(self.log_path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--model", d.model, *args], env=env,
                                     cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def nodes(self) -> list[str]:
        """Celery node names in the log: model-device-pid, e.g. base-gpu1-1234."""
        return sorted(set(re.findall(r"([\w.\-]+-(?:cpu|gpu\d+)-\d+)@", self.text())))

    def wait_ready(self, n: int, timeout_s: float) -> None:
        """Until n workers are ready and hold their model: Celery says "ready" while the model may
        still be loading in the background, and a job that came then waited for it (a one-worker
        phase's first job started 5.3 s after the enqueue where the pair's started at 1.4 s)."""
        deadline = time.monotonic() + timeout_s
        while self.text().count(" ready.") < n or self.text().count("start-up: model") < n:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker {self.log_path.name} did not start:\n{self.text()[-3000:]}")
            time.sleep(POLL_S)

    def totals(self) -> list[dict]:
        """Each worker process's "worker totals" line (logged as it stops)."""
        return [json.loads(m) for m in re.findall(r"worker totals: (\{.*\})", self.text())]

    def stop(self, timeout_s: float = 60) -> None:
        stop_gracefully(self.proc, timeout_s)
        self._log.close()


def start_workers(d: Drill, env_of, n: int, tag: str, *, per_gpu: bool = False) -> list[Worker]:
    if per_gpu:
        w = Worker(d, env_of(1), f"{tag}-per-gpu", "--per-gpu")
        w.wait_ready(n, min(240, d.left_s()))
        return [w]
    workers = [Worker(d, env_of(n), f"{tag}-{dev.replace(':', '')}-{i}", "--device", dev)
               for i, dev in enumerate(d.devices[:n])]
    for w in workers:
        w.wait_ready(1, min(240, d.left_s()))
    return workers


def blas_threads(d: Drill, n_workers: int) -> int | None:
    """OpenBLAS threads per CPU worker: the cores shared out (the README's advice), or as given."""
    if d.blas_threads == 0:
        return max(1, (os.cpu_count() or 1) // n_workers)
    return d.blas_threads


# --- the database's view --------------------------------------------------------------------------------


def job_rows(url: str) -> list:
    from sqlalchemy import func, select

    from models.db import session_scope
    from models.tables import Job, Transcript

    with session_scope(url) as s:
        n = select(func.count(Transcript.id)).where(Transcript.job_id == Job.id).correlate(Job).scalar_subquery()
        return s.execute(select(Job.id, Job.status, Job.worker_host, Job.dispatched_at, Job.started_at, Job.finished_at, Job.duration_s,
                                Job.attempts, n.label("transcripts")).order_by(Job.id)).all()


def rounds_of(totals: dict) -> dict:
    """Where one worker's rounds went: how many, their time on the device, the span from the first
    round's start to the last one's end, the time between rounds, and the ramp and the tail."""
    starts, lengths = totals.get("round_start_ms") or [], totals.get("round_ms") or []
    if not starts:
        return {"rounds": totals.get("rounds", 0)}
    span_ms = starts[-1] + lengths[-1]
    live = totals.get("live_rows", [])
    return {"rounds": totals.get("rounds"), "device_s": totals.get("device_s"), "span_s": round(span_ms / 1000, 2),
            "between_rounds_s": round((span_ms - sum(lengths)) / 1000, 2), "redecoded": totals.get("redecoded"),
            "first_rows": live[:3], "last_rows": live[-4:], "first_rounds_ms": _first_rounds(totals)}


def _first_rounds(totals: dict, n: int = 4) -> list[dict]:
    """The first rounds' length, encode, decode and words (ms): a process's first rounds ran slower."""
    lengths, enc, words = (totals.get(k) or [] for k in ("round_ms", "round_encode_ms", "round_words_ms"))
    return [{"ms": t, "encode": e, "decode": t - e - w, "words": w} for t, e, w in zip(lengths[:n], enc, words)]


def counts(rows: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r.status.value] = out.get(r.status.value, 0) + 1
    return out


def settled(rows: list) -> bool:
    return bool(rows) and all(r.status.value in ("done", "failed") for r in rows)


def wait_settled(d: Drill, url: str, watch=None) -> tuple[list, bool]:
    """Poll until every job is done or failed (True), or the budget runs out (False); watch(rows) each poll."""
    while True:
        rows = job_rows(url)
        if watch is not None:
            watch(rows)
        if settled(rows):
            return rows, True
        if d.left_s() < 0:
            return rows, False
        time.sleep(POLL_S)


def integrity(rows: list, n_files: int, enqueued: dict) -> dict:
    """Every file a job (files of the same content share one: enqueue's "duplicates"), every job
    done, each with exactly one transcript row."""
    twice = [r.id for r in rows if r.transcripts > 1]
    lost = [r.id for r in rows if r.status.value == "done" and r.transcripts == 0]
    not_done = [r.id for r in rows if r.status.value != "done"]
    expected = n_files - enqueued.get("duplicates", 0)
    return {"files": n_files, "jobs": len(rows), "expected_jobs": expected, "statuses": counts(rows),
            "transcript_rows": sum(r.transcripts for r in rows), "jobs_with_2plus_rows": twice,
            "done_without_row": lost, "not_done": not_done, "retried": sum(r.attempts > 1 for r in rows),
            "ok": len(rows) == expected and not twice and not lost and not not_done}


def ts(dt) -> float:
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def rates(rows: list, t0: float) -> dict:
    """Hours of audio per hour from the enqueue's start to the last row (the issue's measure), and
    from the first job's start (the workers' share alone: the enqueue's scan and hashing before
    the first dispatch is the scheduler's, the same for any number of workers)."""
    done = [r for r in rows if r.status.value == "done"]
    audio_s = sum(r.duration_s or 0 for r in done)
    end = max((ts(r.finished_at) for r in done), default=t0)
    first = min((ts(r.started_at) for r in done if r.started_at), default=t0)
    wall_s = end - t0
    per_worker: dict[str, dict] = {}
    for r in done:
        w = per_worker.setdefault(r.worker_host, {"jobs": 0, "audio_s": 0.0})
        w["jobs"] += 1
        w["audio_s"] = round(w["audio_s"] + (r.duration_s or 0), 1)
    dispatched = min((ts(r.dispatched_at) for r in done if r.dispatched_at), default=t0)
    return {"jobs_done": len(done), "audio_hours": round(audio_s / 3600, 3), "wall_s": round(wall_s, 1),
            "audio_hours_per_hour": round(audio_s / wall_s, 1) if wall_s > 0 else None,
            "first_job_dispatched_s": round(dispatched - t0, 1),  # the scheduler's share of the wait
            "first_job_started_s": round(first - t0, 1),
            "audio_hours_per_hour_from_first_job": round(audio_s / (end - first), 1) if end > first else None,
            "per_worker": per_worker}


def enqueue(env: dict, d: Drill, paths: list[Path] | None = None) -> tuple[float, dict]:
    t0 = time.time()
    out = cli(env, "enqueue", *map(str, paths or [d.archive / "files"]), "--json", "-q", timeout_s=600)
    if out.returncode != 0:
        raise SystemExit(f"enqueue failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    return t0, json.loads(out.stdout)


def n_files(d: Drill, paths: list[Path] | None = None) -> int:
    if paths:
        return sum(1 for folder in paths for p in folder.rglob("*") if p.is_file())
    return json.loads((d.archive / "drill.json").read_text())["files"]


WARMUP_FILES = 160  # more than two workers' rows (64 each): their full rounds' shapes get compiled too


def warmup_paths(d: Drill) -> list[Path]:
    """What the warmup transcribes: the long files whole, the clips, and cuttings of the long files
    until there are WARMUP_FILES files, not the whole archive, so that full rounds run (and MLX
    compiles what they need) before anything is measured: after a warm-up of the long files and the
    clips alone (42 files, no round full), the one-worker phase's rounds cost 0.86 s against the
    pair's 0.51 s at the same 64 rows (README "The fleet drill")."""
    files = d.archive / "files"
    found = [files / name for name in ("whole", "clips") if (files / name).is_dir()]
    cuttings = sorted(p for p in files.iterdir() if p.is_dir() and "-pieces-" in p.name) if files.is_dir() else []
    for folder in cuttings:
        if n_files(d, found) >= WARMUP_FILES:
            break
        found.append(folder)
    return found or [files]


# --- phases -------------------------------------------------------------------------------------------


def build(d: Drill, audio_root: Path, small: bool, tilings: int, copies: int) -> dict:
    """The archive in --work/archive/files: build_archive.py's pieces, or (--small) unique short clips."""
    files = d.archive / "files"
    if (d.archive / "drill.json").exists():
        return json.loads((d.archive / "drill.json").read_text())
    shutil.rmtree(d.archive, ignore_errors=True)
    t0 = time.monotonic()
    if small:
        files.mkdir(parents=True)
        serial = 0
        for copy in range(copies):  # each clip `copies` times, its last sample changed: a new file to the content hash
            for name in SMALL_CLIPS:
                data = bytearray((audio_root / "en" / name).read_bytes())
                if name.endswith(".wav"):
                    serial += 1
                    data[-2:] = serial.to_bytes(2, "little", signed=True)
                elif copy:
                    continue  # a compressed clip once (changing a byte could break its last frame)
                (files / f"{copy}-{name}").write_bytes(bytes(data))
    else:
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "build_archive.py"), "--shared", str(audio_root),
                        "--out", str(files), "--tilings", str(tilings)], cwd=REPO, check=True)
    paths = sorted(p for p in files.rglob("*") if p.is_file() and p.suffix != ".json")
    manifest = files / "manifest.json"
    seconds = (sum(f["seconds"] for f in json.loads(manifest.read_text())["files"]) if manifest.exists()
               else sum(_duration_s(p) for p in paths))
    info = {"files": len(paths), "audio_hours": round(seconds / 3600, 3), "build_s": round(time.monotonic() - t0, 1)}
    if manifest.exists():
        manifest.rename(d.archive / "manifest.json")  # not an audio file: kept out of the enqueued folder
    (d.archive / "drill.json").write_text(json.dumps(info))
    return info


def _duration_s(path: Path) -> float:
    from engine.audio import SAMPLE_RATE, load_audio

    return len(load_audio(str(path))) / SAMPLE_RATE


def throughput(d: Drill, phase: str, n_workers: int) -> dict:
    url = fresh_database(d, f"drill_{phase}")
    env = env_for(d, url)
    broker = empty_broker(env)
    observe = phase.startswith("tp2")
    flower = start_flower(d, env) if observe else None
    threads = lambda n: blas_threads(d, n)  # noqa: E731
    workers = start_workers(d, lambda n: env_for(d, url, threads=threads(n)), n_workers, phase,
                            per_gpu=d.per_gpu and n_workers == 2)
    seen: dict = {}
    paths = warmup_paths(d) if phase == "warmup" else None
    try:
        t0, enqueued = enqueue(env, d, paths)
        total = n_files(d, paths)

        def watch(rows):  # (d) mid-run: once half the jobs are done
            if observe and "status" not in seen and counts(rows).get("done", 0) >= total // 2:
                seen["status"] = json.loads(cli(env, "status", "--json").stdout)
                seen["flower"] = flower_view(flower)

        rows, finished = wait_settled(d, url, watch)
    finally:
        for w in workers:
            w.stop()
        if flower is not None:
            flower[0].terminate()
            flower[0].wait(timeout=30)
    result = {"phase": phase, "workers": n_workers, "devices": list(d.devices[:n_workers]), "finished": finished,
              "nodes": sorted({n for w in workers for n in w.nodes()}), "broker": broker,
              "enqueued": {k: v for k, v in enqueued.items() if not isinstance(v, (list, dict))},
              **rates(rows, t0), "integrity": integrity(rows, n_files(d, paths), enqueued),
              "rounds": [rounds_of(totals) for w in workers for totals in w.totals()]}
    if observe:
        result["mid_run"] = seen
        (d.out / f"{phase}_status_mid_run.json").write_text(json.dumps(seen.get("status"), indent=1, default=str))
    return result


def start_flower(d: Drill, env: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = d.work / "logs" / "flower.log"
    d.logs.append(log)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "flower", "--port", str(port)], env=env, cwd=REPO,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}/api"


def flower_view(flower: tuple[subprocess.Popen, str]) -> dict:
    """Flower's API: the workers it lists and, from the tasks, each worker's audio hours per hour so far."""
    import requests

    _, api = flower
    try:
        workers = requests.get(f"{api}/workers", params={"refresh": 1}, auth=FLOWER_AUTH, timeout=30).json()
        tasks = requests.get(f"{api}/tasks", auth=FLOWER_AUTH, timeout=30).json()
        anonymous = requests.get(f"{api}/workers", timeout=10).status_code
    except (requests.RequestException, ValueError) as e:
        return {"error": str(e)}
    by_worker: dict[str, dict] = {}
    for t in tasks.values():
        if t.get("state") != "SUCCESS" or not t.get("worker"):
            continue
        try:
            result = ast.literal_eval(t["result"]) if isinstance(t.get("result"), str) else t.get("result") or {}
        except (ValueError, SyntaxError):
            result = {}
        w = by_worker.setdefault(t["worker"], {"tasks": 0, "audio_s": 0.0, "first_started": None, "last_done": None,
                                               "device": result.get("device")})
        w["tasks"] += 1
        w["audio_s"] += float(result.get("audio_s") or 0)
        w["first_started"] = min(filter(None, (w["first_started"], t.get("started"))), default=None)
        w["last_done"] = max(filter(None, (w["last_done"], t.get("succeeded"))), default=None)
    for w in by_worker.values():
        span = (w["last_done"] or 0) - (w["first_started"] or 0)
        w["audio_hours_per_hour"] = round(w["audio_s"] / span, 1) if span > 0 else None
        w["audio_s"] = round(w["audio_s"], 1)
    return {"workers": sorted(workers), "tasks_seen": len(tasks), "by_worker": by_worker,
            "anonymous_request_status": anonymous}


def kill_one(d: Drill) -> dict:
    """SIGKILL the second worker while it holds jobs; time until each comes back; then all done once."""
    url = fresh_database(d, "drill_kill")
    env = env_for(d, url)
    empty_broker(env)
    threads = blas_threads(d, 2)
    survivor, victim = start_workers(d, lambda n: env_for(d, url, threads=threads), 2, "kill")
    restarted = None
    try:
        t0, enqueued = enqueue(env, d)
        total = n_files(d)
        tag = f":{victim.proc.pid}"
        while True:  # a quarter done, and the victim holds files
            rows = job_rows(url)
            held = [r.id for r in rows if r.status.value == "running" and (r.worker_host or "").endswith(tag)]
            if held and counts(rows).get("done", 0) >= total // 4:
                break
            if d.left_s() < 0 or settled(rows):
                return {"phase": "kill", "error": "the victim never held a job"}
            time.sleep(0.05)
        victim.proc.send_signal(signal.SIGKILL)
        killed = time.time()
        victim.proc.wait()
        back: dict[int, dict] = {}
        while len(back) < len(held) and time.time() - killed < 4 * d.lease_s + 60:
            for r in job_rows(url):
                if r.id in held and r.id not in back and not (r.worker_host or "").endswith(tag):
                    back[r.id] = {"status": r.status.value, "holder": r.worker_host,
                                  "reclaimed_s": round(ts(r.started_at) - killed, 1) if r.started_at else None,
                                  "seen_s": round(time.time() - killed, 1)}
            time.sleep(POLL_S)
        restarted = Worker(d, env_for(d, url, threads=threads), "kill-restarted", "--device", d.devices[1])
        rows, finished = wait_settled(d, url)
    finally:
        for w in (survivor, victim, restarted):
            if w is not None:
                w.stop()
    came_back_s = [b["seen_s"] for b in back.values()]
    return {"phase": "kill", "finished": finished, "lease_s": d.lease_s, "target_s": d.lease_s + 10,
            "held_when_killed": len(held), "came_back": len(back), "jobs": back,
            "max_came_back_s": max(came_back_s, default=None),
            "within_target": len(back) == len(held) and max(came_back_s, default=0) <= d.lease_s + 10,
            **rates(rows, t0), "integrity": integrity(rows, n_files(d), enqueued)}


def kill_broker(d: Drill) -> dict:
    """SIGKILL the embedded Valkey a quarter of the way through, start it again 5 s later."""
    url = fresh_database(d, "drill_broker")
    env = env_for(d, url)
    broker = empty_broker(env)
    threads = blas_threads(d, 2)
    workers = start_workers(d, lambda n: env_for(d, url, threads=threads), 2, "broker")
    try:
        t0, enqueued = enqueue(env, d)
        total = n_files(d)
        while counts(rows := job_rows(url)).get("done", 0) < total // 4 and not settled(rows) and d.left_s() > 0:
            time.sleep(0.05)
        pid = broker_state(env)["pid"]
        done_at_kill = counts(rows).get("done", 0)
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        time.sleep(5)
        started = cli(env, "broker", "start")
        back_s = round(time.time() - killed, 1)
        rows, finished = wait_settled(d, url)
    finally:
        for w in workers:
            w.stop()
    return {"phase": "broker", "finished": finished, "valkey_pid_killed": pid, "done_at_kill": done_at_kill,
            "broker_back_after_s": back_s, "restart": (started.stdout + started.stderr).strip(), "broker": broker,
            "all_done_after_kill_s": round(max(ts(r.finished_at) for r in rows if r.finished_at) - killed, 1),
            **rates(rows, t0), "integrity": integrity(rows, n_files(d), enqueued)}


# --- report ---------------------------------------------------------------------------------------------


def _repetition(name: str) -> tuple[int, str]:
    """"tp2-3" -> (3, "tp2"): phases in the order they ran."""
    base, _, n = name.partition("-")
    return int(n or 1), base


def ratio_lines(results: dict) -> list[str]:
    """Two workers against one, each pair (tp1-k, tp2-k, run one after the other) on its own, then
    the best of each against the best of the other."""
    end, first = "audio_hours_per_hour", "audio_hours_per_hour_from_first_job"
    pairs = []  # (one worker's result, two workers'), None where missing or not intact
    for k in itertools.count(1):
        suffix = "" if k == 1 else f"-{k}"
        if f"tp1{suffix}" not in results and f"tp2{suffix}" not in results:
            break
        pairs.append(tuple(tp if tp and tp.get("integrity", {}).get("ok") else None
                           for tp in (results.get(f"tp1{suffix}"), results.get(f"tp2{suffix}"))))

    def ratio(one: dict | None, two: dict | None, key: str) -> float | None:
        return two[key] / one[key] if one and two and one.get(key) and two.get(key) else None

    lines = []
    for k, (one, two) in enumerate(pairs, 1):
        if (r := ratio(one, two, end)) is None:
            continue
        parts = [f"**{r:.2f}x** end to end (enqueue to the last row)"]
        if (r := ratio(one, two, first)) is not None:
            parts.append(f"{r:.2f}x from the first job's start")
        spans = [max((w.get("span_s") or 0 for w in tp.get("rounds", [])), default=0) for tp in (one, two)]
        if all(spans):
            parts.append(f"{spans[0] / spans[1]:.2f}x from the first round to the last")
        lines.append(f"- pair {k}: two workers / one worker " + ", ".join(parts))
    if len(pairs) > 1:
        best = [{key: max((p[n][key] for p in pairs if p[n] and p[n].get(key)), default=None) for key in (end, first)}
                for n in (0, 1)]
        if (r := ratio(*best, end)) is not None:
            r_first = ratio(*best, first)
            lines.append(f"- best two-worker run / best one-worker run: **{r:.2f}x** end to end"
                         + (f", {r_first:.2f}x from the first job's start" if r_first is not None else ""))
    return lines


def summary(results: dict) -> str:
    lines = ["# Fleet drill", ""]
    if "build" in results:
        b = results["build"]
        lines.append(f"Archive: {b['files']} files, {b['audio_hours']} h of audio. Services: {results.get('services')}.")
    for name in sorted((n for n in results if n.startswith(("tp1", "tp2"))), key=_repetition):
        tp = results[name]
        lines.append(f"- {tp['phase']}: {tp['workers']} worker(s) on {', '.join(tp['devices'])}: {tp['jobs_done']} jobs, "
                     f"{tp['audio_hours']} h in {tp['wall_s']} s = **{tp['audio_hours_per_hour']} audio hours/hour**; "
                     f"first job dispatched {tp.get('first_job_dispatched_s')} s and started {tp.get('first_job_started_s')} s "
                     f"after the enqueue began, {tp.get('audio_hours_per_hour_from_first_job')} h/h from there; "
                     f"integrity ok: {tp['integrity']['ok']}")
        for r in tp.get("rounds", []):
            if "span_s" in r:
                lines.append(f"  - a worker: {r['rounds']} rounds, {r['device_s']} s on the device, {r['span_s']} s from the "
                             f"first round to the last, {r['between_rounds_s']} s between rounds; rows {r['first_rows']} ... "
                             f"{r['last_rows']}; {r['redecoded']} window(s) decoded again hotter")
    lines += ratio_lines(results)
    tp2 = results.get("tp2")
    if tp2 and tp2.get("mid_run"):
        status = tp2["mid_run"].get("status") or {}
        for w in status.get("workers", []):
            lines.append(f"  - status mid-run: {w['host']} on {w['device']}: {w['audio_hours_per_hour'] and round(w['audio_hours_per_hour'], 1)} h/h")
        fl = tp2["mid_run"].get("flower") or {}
        for name, w in (fl.get("by_worker") or {}).items():
            lines.append(f"  - Flower mid-run: {name} ({w['device']}): {w['tasks']} tasks, {w['audio_hours_per_hour']} h/h")
    if k := results.get("kill"):
        lines.append(f"- SIGKILL of one worker holding {k.get('held_when_killed')} job(s): back after at most "
                     f"{k.get('max_came_back_s')} s (lease {k.get('lease_s')} s, target {k.get('target_s')} s: "
                     f"{'met' if k.get('within_target') else 'MISSED'}); integrity ok: {k.get('integrity', {}).get('ok')}")
    if br := results.get("broker"):
        lines.append(f"- Valkey SIGKILLed at {br.get('done_at_kill')} jobs done, back after {br.get('broker_back_after_s')} s: "
                     f"integrity ok: {br.get('integrity', {}).get('ok')} ({br.get('integrity', {}).get('statuses')}, "
                     f"{br.get('integrity', {}).get('transcript_rows')} transcript rows)")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="state kept between calls (archive, pgdata, results)")
    ap.add_argument("--out", type=Path, required=True, help="where fleet_drill.json, fleet_drill.md and logs go")
    ap.add_argument("--audio-root", type=Path, default=REPO.parent / "shared" / "audio", help="../shared/audio or a copy")
    ap.add_argument("--models-dir", type=Path, default=None, help="ARCHIVE_ASR_MODELS_DIR (the model pre-converted)")
    ap.add_argument("--model", default=None, help="default: base (tiny.en with --small)")
    ap.add_argument("--phases", default="all", help=f"comma-separated from {','.join(PHASES)}, or all")
    ap.add_argument("--repeat", type=int, default=1, help="run tp1 and tp2 alternately this many times")
    ap.add_argument("--small", action="store_true", help="CPU rehearsal: tiny.en, short clips, two CPU workers")
    ap.add_argument("--batch-size", type=int, default=0, help="every worker's rows (default: each plans its own)")
    ap.add_argument("--tilings", type=int, default=13, help="build_archive.py --tilings (13: 4.3 h; 12 is 4.03 h)")
    ap.add_argument("--lease-s", type=int, default=None, help="ARCHIVE_ASR_LEASE_S (default 20; 6 with --small)")
    ap.add_argument("--blas-threads", type=int, default=0,
                    help="--small: OPENBLAS_NUM_THREADS per worker (0: cores / workers)")
    ap.add_argument("--copies", type=int, default=2, help="--small: each WAV clip this many times, made unique")
    ap.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an ARCHIVE_ASR_* setting for every worker, e.g. ARCHIVE_ASR_MIN_REGION_S=60 (repeatable)")
    ap.add_argument("--database-url", default=None, help="an existing PostgreSQL server to create the databases on")
    ap.add_argument("--budget-s", type=float, default=530, help="start no phase, and wait no longer, after this")
    ap.add_argument("--phase-estimate-s", type=float, default=150, help="a phase's length before one has run")
    args = ap.parse_args()
    phases = with_repeats(PHASES, args.repeat) if args.phases == "all" else named_phases(args.phases, args.repeat)
    d = Drill(work=args.work.resolve(), out=args.out.resolve(), model=args.model or ("tiny.en" if args.small else "base"),
              devices=("cpu", "cpu") if args.small else ("gpu:0", "gpu:1"), per_gpu=not args.small,
              lease_s=args.lease_s or (6 if args.small else 20),
              models_dir=(args.models_dir or (REPO / ".data" / "test-models" if args.small else REPO / ".data" / "models")).resolve(),
              blas_threads=args.blas_threads if args.small else None, deadline=time.monotonic() + args.budget_s,
              batch_size=args.batch_size, worker_env=dict(kv.split("=", 1) for kv in args.worker_env))
    for p in (d.work, d.out, d.work / "results"):
        p.mkdir(parents=True, exist_ok=True)
    start_postgres(d, args.database_url)
    os.environ["ARCHIVE_ASR_DATA_DIR"] = str(d.data_dir)  # this process reads only the phases' databases
    services = {"blas_threads": args.blas_threads if args.small else None, "batch_size": d.batch_size or "planned", "postgresql": "pgserver" if d.server else "given", "postgres_version": _pg_version(d),
                "broker": "embedded Valkey (password from broker.json)", "lease_s": d.lease_s, "model": d.model,
                "host": socket.gethostname(), "gpus": _gpus()}
    (d.work / "results" / "services.json").write_text(json.dumps(services))
    try:
        left = run_phases(d, args, phases)
    finally:  # the embedded Valkey outlives its starter: stop it (PostgreSQL stops as this process exits)
        cli(env_for(d, d.base_url), "broker", "stop")
    results = {p.stem: json.loads(p.read_text()) for p in sorted((d.work / "results").glob("*.json"))}
    (d.out / "fleet_drill.json").write_text(json.dumps(results, indent=1, default=str))
    (d.out / "fleet_drill.md").write_text(summary(results))
    logs = d.out / "logs"
    logs.mkdir(exist_ok=True)
    for log in d.logs:  # compressed: a call's files come back only under the device tool's size limits
        if log.exists():
            (logs / f"{log.name}.gz").write_bytes(gzip.compress(log.read_bytes()[-2_000_000:]))
    print(summary(results))
    if left:
        print(f"out of budget: run again with --phases {','.join(left)}", file=sys.stderr)
        raise SystemExit(3)


def with_repeats(phases: tuple[str, ...], repeat: int) -> tuple[str, ...]:
    """("build", "tp1", "tp2", "kill"), 3 -> build, tp1, tp2, tp1-2, tp2-2, tp1-3, tp2-3, kill."""
    tps = [p for p in phases if p in ("tp1", "tp2")]
    if repeat <= 1 or not tps:
        return phases
    at = phases.index(tps[0])
    rest = [p for p in phases[at:] if p not in tps]
    again = [f"{p}-{k}" for k in range(2, repeat + 1) for p in tps]
    return (*phases[:at], *tps, *again, *rest)


def named_phases(names: str, repeat: int) -> tuple[str, ...]:
    """--phases in the drill's order; a repetition by name ("tp1-2,tp2-2": the second pair, in a
    call of its own when one call's time does not hold two pairs)."""
    asked = names.split(",")
    unknown = [n for n in asked if _repetition(n)[1] not in PHASES]
    if unknown:
        raise SystemExit(f"unknown phases: {', '.join(unknown)} (from {', '.join(PHASES)}, or tp1-2 and the like)")
    plain = with_repeats(tuple(p for p in PHASES if p in asked), repeat)
    again = tuple(n for n in asked if n not in PHASES and n not in plain)
    return (*plain, *sorted(again, key=lambda n: _repetition(n)))


def run_phases(d: Drill, args: argparse.Namespace, phases: tuple[str, ...]) -> list[str]:
    """Run the phases in order while the budget lasts; those left for another call."""
    left: list[str] = []
    for phase in phases:
        done_before = [json.loads(p.read_text()).get("phase_s", 0) for p in (d.work / "results").glob("*.json")
                       if _repetition(p.stem)[1] in ("tp1", "tp2", "kill", "broker")]
        needs_s = 1.2 * max(done_before, default=args.phase_estimate_s)  # the longest phase so far, with a margin
        if left or (phase != "build" and d.left_s() < needs_s):
            left.append(phase)
            continue
        print(f"--- {phase}", flush=True)
        t0 = time.monotonic()
        if phase == "build":
            result = build(d, args.audio_root, args.small, args.tilings, args.copies)
        elif _repetition(phase)[1] in ("warmup", "tp1", "tp2"):
            result = throughput(d, phase, 1 if _repetition(phase)[1] == "tp1" else 2)
        elif phase == "kill":
            result = kill_one(d)
        else:
            result = kill_broker(d)
        result["phase_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps(result, default=str)[:1500], flush=True)
        (d.work / "results" / f"{phase}.json").write_text(json.dumps(result, default=str))
    return left


def _pg_version(d: Drill) -> str:
    import psycopg

    with psycopg.connect(d.base_url) as conn:
        return conn.execute("SHOW server_version").fetchone()[0]


def _gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.stdout.strip().splitlines()


if __name__ == "__main__":
    main()
