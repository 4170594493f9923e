"""How fast a file is prepared: engine.audio's decoding, by container, and engine.mel's log-mel,
in x real time per CPU second.

A worker decodes every file in a child process and computes its log-mel in a thread, beside the
device's rounds, so this is host CPU per audio hour (on a GPU host, what a second worker's
preparing takes from the first: README, "The fleet drill"). Files from an archive made by
build_archive.py (FLAC, MP3, Opus, M4A, WAV); each container's files are prepared REPEAT times,
the best pass reported.

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
from engine.blas import single_threaded_numpy_blas  # noqa: E402
from engine.mel import file_mel  # noqa: E402


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
    single_threaded_numpy_blas()  # as a session does for its preparing threads
    results = {}
    for ext, paths in sorted(by_ext.items()):
        best_decode_s = best_mel_s = float("inf")
        audio_s = 0.0
        for _ in range(args.repeat):
            decode_s = mel_s = 0.0
            n = 0
            for p in paths:
                t0 = time.process_time()
                chunks = list(iter_audio(p, chunk_s=30.0))  # (30 s chunks, as a worker's decoder sends them)
                t1 = time.process_time()
                file_mel(iter(chunks), 80).close()
                decode_s, mel_s = decode_s + t1 - t0, mel_s + time.process_time() - t1
                n += sum(len(c) for c in chunks)
            best_decode_s, best_mel_s, audio_s = min(best_decode_s, decode_s), min(best_mel_s, mel_s), n / SAMPLE_RATE
        results[ext] = {"files": len(paths), "audio_s": round(audio_s, 1), "decode_cpu_s": round(best_decode_s, 3),
                        "mel_cpu_s": round(best_mel_s, 3), "decode_x": round(audio_s / best_decode_s),
                        "mel_x": round(audio_s / best_mel_s)}
        print(f"{ext:5s} {len(paths):3d} files, {audio_s:7.1f} s of audio: decoding {audio_s / best_decode_s:6.0f}x, "
              f"log-mel {audio_s / best_mel_s:6.0f}x real time per CPU second", flush=True)
    total = {k: sum(r[k] for r in results.values()) for k in ("audio_s", "decode_cpu_s", "mel_cpu_s")}
    decode_x, mel_x = total["audio_s"] / total["decode_cpu_s"], total["audio_s"] / total["mel_cpu_s"]
    print(f"all   {total['audio_s']:.1f} s of audio: decoding {decode_x:.0f}x, log-mel {mel_x:.0f}x real time per CPU second")
    if args.json_out:
        args.json_out.write_text(json.dumps({"containers": results, "decode_x": round(decode_x), "mel_x": round(mel_x)}, indent=1))


if __name__ == "__main__":
    main()
