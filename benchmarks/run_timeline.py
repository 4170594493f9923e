"""Where `archive-asr run`'s seconds go: its own output and its worker's log, each line with the
seconds since the command started (the worker's lines from their timestamps).

    .venv/bin/python benchmarks/run_timeline.py tests/data/samples --model tiny.en

Runs in a fresh data folder (SQLite, an embedded Valkey). A script that prints, not a test.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER_LINE = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): [^]]*\] (.*)")
SKIP = ("Task archive_asr.transcribe", "SecurityWarning")  # one line per job; Celery's root warning


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--model", default="tiny.en")
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="archive-asr-timeline-"))
    env = {**os.environ, "ARCHIVE_ASR_DATA_DIR": str(data)}
    env.pop("ARCHIVE_ASR_DATABASE_URL", None)
    env.pop("ARCHIVE_ASR_BROKER_URL", None)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", str(args.folder), "--model", args.model, "--quiet"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.time() - t0, "run", line.rstrip()) for line in proc.stdout]
    proc.wait()
    lines.append((time.time() - t0, "run", f"(exit {proc.returncode})"))
    for log in (data / "logs").glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            m = WORKER_LINE.match(line)
            if m and not any(s in line for s in SKIP):
                at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
                lines.append((at - t0, "worker", m.group(3)))
    for at, who, text in sorted(lines, key=lambda x: x[0]):
        if text.strip() and not text.startswith(("│", "┃", "┏", "┗", "└", "┡", "━")):
            print(f"{at:7.2f}  {who:6}  {text[:160]}")


if __name__ == "__main__":
    main()
