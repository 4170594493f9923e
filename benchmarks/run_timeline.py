"""Where `archive-asr run`'s seconds go: its own output and its worker's log, each line with the
seconds since the command started (the worker's lines from their timestamps).

    .venv/bin/python benchmarks/run_timeline.py tests/data/samples --model tiny.en

Runs in a fresh data folder (SQLite, an embedded Valkey). A script that prints, not a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_run import log_lines  # noqa: E402

SKIP = ("Task archive_asr.transcribe",)  # one line per job


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
        for at, message in log_lines(log.read_text(errors="replace")):
            if not message.startswith(SKIP):
                lines.append((at - t0, "worker", message))
    for at, who, text in sorted(lines, key=lambda x: x[0]):
        if text.strip() and not text.startswith(("│", "┃", "┏", "┗", "└", "┡", "━")):
            print(f"{at:7.2f}  {who:6}  {text[:160]}")


if __name__ == "__main__":
    main()
