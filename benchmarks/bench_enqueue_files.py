"""How long `archive-asr enqueue` takes over a folder of many small files, first and second run.

    .venv/bin/python benchmarks/bench_enqueue_files.py [--files 100000] [--root /dev/shm/x]

Files are tiny, unique, with audio extensions (not real audio: the duration probe fails fast,
as it would on a corrupt file), so this measures scanning, hashing and the database writes.
Set ARCHIVE_ASR_DATABASE_URL to time PostgreSQL; the default is a SQLite file under the root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--per-folder", type=int, default=1000)
    parser.add_argument("--root", default=None, help="scratch folder (default: under /dev/shm if it exists)")
    args = parser.parse_args()
    base = args.root or tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    root = Path(base)
    tree = root / "tree"
    t0 = time.perf_counter()
    for i in range(args.files):
        folder = tree / f"box {i // args.per_folder:04d}"
        if i % args.per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"tape {i:06d}.wav").write_bytes(b"RIFF" + i.to_bytes(8, "little"))
    print(f"made {args.files} files in {time.perf_counter() - t0:.1f} s under {tree}")

    env = dict(os.environ, ARCHIVE_ASR_DATA_DIR=str(root / "data"))
    cli = [str(Path(sys.executable).parent / "archive-asr"), "enqueue", "--no-dispatch", "--quiet", str(tree)]
    try:
        for label in ("first run (hash + insert)", "second run (nothing new)"):
            t0 = time.perf_counter()
            out = subprocess.run(cli, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if out.returncode != 0:
                sys.exit(out.stderr)
            print(f"{label}: {wall:.1f} s  ({args.files / wall:,.0f} files/s)")
            print("   " + out.stdout.strip().replace("\n", "\n   "))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
