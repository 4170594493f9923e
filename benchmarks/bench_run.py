"""End to end: `archive-asr run` over an archive folder, files in to rows out, where the time went.

    .venv/bin/python benchmarks/build_archive.py --out /tmp/archive --tilings 9
    .venv/bin/python benchmarks/bench_archive.py --archive /tmp/archive --model base --json-out engine.json
    .venv/bin/python benchmarks/bench_run.py --archive /tmp/archive --model base --compare engine.json

Runs the real thing on embedded defaults in a fresh data folder: SQLite, an embedded Valkey, one
local worker (`python -m cli run FOLDER`). Reports x real time over the whole command (enqueue:
hashing and probing every file; the worker's start and model load; transcription; the database)
and over the time jobs were running; where the worker's time went (its log's "worker totals":
audio decoding and log-mel in background threads, the device's rounds, the database, the
driver idle); WER per set from the database's transcripts; and, with ``--compare`` (a
bench_archive.py JSON of the same archive), the engine-only x real time beside it and how far
the stored texts are from sequential Whisper's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_archive import errors, wer_table  # noqa: E402


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): [^]]*\] (.*)$", re.MULTILINE)


def log_lines(text: str) -> list[tuple[float, str]]:
    """(when, message) of each line of a worker log:
    "[2026-11-27 23:21:40,422: INFO/MainProcess] engine session: ..." (local time)."""
    return [
        (datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000, m.group(3))
        for m in LOG_LINE.finditer(text)
    ]


def _logged_at(text: str, message: str) -> list[float]:
    """When a worker log logged lines whose message starts with the regex ``message``."""
    return [at for at, line in log_lines(text) if re.match(message, line)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", type=Path, required=True)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--batch-size", default=None)
    ap.add_argument("--compare", type=Path, help="bench_archive.py --json-out of the same archive")
    ap.add_argument("--compare-method", default="engine-words", help="its engine method to compare with (engine-words:b128)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    manifest = json.loads((args.archive / "manifest.json").read_text())
    data = Path(tempfile.mkdtemp(prefix="archive-asr-run-"))
    env = {**os.environ, "ARCHIVE_ASR_DATA_DIR": str(data)}
    env.pop("ARCHIVE_ASR_DATABASE_URL", None)
    env.pop("ARCHIVE_ASR_BROKER_URL", None)
    cmd = [sys.executable, "-m", "cli", "run", str(args.archive), "--model", args.model, "--quiet"]
    if args.batch_size:
        cmd += ["--batch-size", args.batch_size]
    t0_wall = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")

    db = sqlite3.connect(data / "archive.db")
    rows = db.execute(
        "SELECT j.path, j.status, j.started_at, j.finished_at, t.text, t.duration_s FROM jobs j "
        "LEFT JOIN transcripts t ON t.job_id = j.id"
    ).fetchall()
    base = str(args.archive.resolve()) + "/"
    # every path holding a job's content (the same recording at two paths is transcribed once)
    texts = {
        path.removeprefix(base): text or ""
        for path, text in db.execute(
            "SELECT f.path, t.text FROM files f JOIN jobs j ON j.sha256 = f.sha256 JOIN transcripts t ON t.job_id = j.id"
        )
    }
    status = {}
    for _, s, *_ in rows:
        status[s] = status.get(s, 0) + 1
    audio_s = sum(d or 0 for *_, d in rows)
    starts = [_ts(r[2]) for r in rows if r[2]]
    ends = [_ts(r[3]) for r in rows if r[3]]
    span = max(ends) - min(starts) if starts and ends else float("nan")
    totals = {}
    session_up: list[float] = []
    worker_ready: list[float] = []  # Celery's "<node> ready."
    start_up: list[str] = []  # the worker's own account of its start (worker.commands, worker.lifecycle)
    for log in (data / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        for m in re.finditer(r"worker totals: (\{.*\})", text):
            totals = json.loads(m.group(1))
            # rows run per round, one line: the ramp at the start and the tail at the end
            totals["live_rows"] = " ".join(map(str, totals.get("live_rows", [])))
        session_up += _logged_at(text, "engine session:")
        worker_ready += _logged_at(text, r"\S+@\S+ ready\.")
        start_up += re.findall(r"\] start-up: (.*)", text)
    result = {
        "exit_code": proc.returncode,
        "jobs": status,
        "audio_s": round(audio_s, 1),
        "command_wall_s": round(wall, 2),
        "x_real_time_command": round(audio_s / wall, 1),
        "jobs_span_s": round(span, 2),
        "x_real_time_jobs_span": round(audio_s / span, 1),
        "worker_totals": totals,
        "worker_start_up": start_up,
        # seconds from the command's start: where the time outside the jobs went
        "timeline_s": {
            "worker_ready": round(min(worker_ready) - t0_wall, 2) if worker_ready else None,
            "model_loaded": round(min(session_up) - t0_wall, 2) if session_up else None,
            "first_job_started": round(min(starts) - t0_wall, 2) if starts else None,
            "last_job_finished": round(max(ends) - t0_wall, 2) if ends else None,
            "command_ended": round(wall, 2),
        },
    }
    if all(f["path"] in texts for f in manifest["files"]):
        result["wer"] = wer_table(manifest, texts)
    if args.compare:
        engine = json.loads(args.compare.read_text())
        methods = engine["methods"]
        result["engine_only_method"] = args.compare_method
        result["engine_only_x_real_time_words"] = methods.get(args.compare_method, {}).get("x_real_time")
        if result["engine_only_x_real_time_words"]:
            result["e2e_over_engine_only"] = round(result["x_real_time_command"] / result["engine_only_x_real_time_words"], 3)
        seq = engine.get("texts", {}).get("seq-words") or engine.get("texts", {}).get("seq")
        if seq:
            langs = {f["path"]: f["language"] for f in manifest["files"]}
            err = n = 0
            for path, text in seq.items():
                e, r = errors(text, texts.get(path, ""), langs[path])
                err, n = err + e, n + r
            result["words_differ_from_sequential_percent"] = round(100 * err / max(1, n), 3)
            seq_x = methods.get("seq-words", {}).get("x_real_time")
            if seq_x:
                result["speedup_over_sequential_words"] = round(result["x_real_time_command"] / seq_x, 2)
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
