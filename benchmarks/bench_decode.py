"""How fast engine.audio decodes each container: x real time per CPU second, by file extension.

A worker decodes every file in a child process beside the device's rounds, so this is host CPU
per audio hour (on a GPU host, what a second worker's decoders take from the first: README, "The
fleet drill"). Files from an archive made by build_archive.py (FLAC, MP3, Opus, M4A, WAV);
each container's files are decoded REPEAT times, the best pass reported.

    .venv/bin/python benchmarks/build_archive.py --out /tmp/arch --tilings 3
    .venv/bin/python benchmarks/bench_decode.py --archive /tmp/arch
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401
from engine.audio import SAMPLE_RATE, iter_audio  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", type=Path, required=True, help="a folder made by build_archive.py")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    manifest = json.loads((args.archive / "manifest.json").read_text())
    by_ext: dict[str, list[Path]] = collections.defaultdict(list)
    for f in manifest["files"]:
        by_ext[f["path"].rsplit(".", 1)[-1]].append(args.archive / f["path"])
    results = {}
    for ext, paths in sorted(by_ext.items()):
        best_cpu_s, audio_s = float("inf"), 0.0
        for _ in range(args.repeat):
            t0, n = time.process_time(), 0
            for p in paths:
                n += sum(len(c) for c in iter_audio(p, chunk_s=30.0))
            best_cpu_s, audio_s = min(best_cpu_s, time.process_time() - t0), n / SAMPLE_RATE
        results[ext] = {"files": len(paths), "audio_s": round(audio_s, 1), "cpu_s": round(best_cpu_s, 3),
                        "x_real_time": round(audio_s / best_cpu_s)}
        print(f"{ext:5s} {len(paths):3d} files, {audio_s:7.1f} s of audio: {audio_s / best_cpu_s:6.0f}x real time per CPU second", flush=True)
    total_audio = sum(r["audio_s"] for r in results.values())
    total_cpu = sum(r["cpu_s"] for r in results.values())
    print(f"all   {total_audio:.1f} s of audio: {total_audio / total_cpu:.0f}x real time per CPU second")
    if args.json_out:
        args.json_out.write_text(json.dumps({"containers": results, "x_real_time": round(total_audio / total_cpu)}, indent=1))


if __name__ == "__main__":
    main()
