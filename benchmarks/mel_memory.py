"""Peak memory of the log-mel for a 10-minute vs a 3-hour file: streamed blocks vs whole-signal.

Builds the long file by concatenating the 10-minute benchmark file (16-bit WAV in a temp folder),
then runs each method in a fresh process and prints its peak RSS and MLX peak memory:

  stream      engine.audio.iter_audio -> engine.mel.file_mel: blocks computed as the audio streams in,
              held in RAM up to an hour of frames, in a memory-mapped temporary file beyond
              (what a long job does: memory should not depend on the length)
  log_mel     engine.audio.load_audio, then engine.mel.file_mel on the whole array
              (audio and mel held; only the intermediates are bounded)
  mlx_whisper load_audio, then mlx_whisper.audio.log_mel_spectrogram on the whole array

Usage: .venv/bin/python benchmarks/mel_memory.py [--hours 3] [--methods stream,log_mel,mlx_whisper]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "audio" / "longform" / "english_read_mix_concat.flac"


def build(path: Path, repeats: int) -> None:
    """SOURCE repeated `repeats` times, written piece by piece (never the whole signal in memory)."""
    import soundfile as sf

    sys.path.insert(0, str(REPO))
    from engine.audio import load_audio

    audio = load_audio(SOURCE)
    with sf.SoundFile(path, "w", samplerate=16000, channels=1, subtype="PCM_16") as f:
        for _ in range(repeats):
            f.write(audio)


def measure(method: str, path: str) -> dict:
    """Run in a child process: one method on one file; peak memory as seen from inside."""
    import resource

    sys.path.insert(0, str(REPO))
    import engine  # noqa: F401  (OpenBLAS before mlx.core)
    import mlx.core as mx

    from engine.audio import iter_audio, load_audio
    from engine.mel import file_mel

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    frames = 0
    if method == "stream":
        fm = file_mel(iter_audio(path, chunk_s=30.0))
        frames = fm.content_frames
        fm.close()
    elif method == "log_mel":
        fm = file_mel([load_audio(path)])
        frames = fm.content_frames
        fm.close()
    elif method == "mlx_whisper":
        from mlx_whisper.audio import log_mel_spectrogram

        mel = log_mel_spectrogram(load_audio(path))
        mx.eval(mel)
        frames = mel.shape[0]
    else:
        raise SystemExit(f"unknown method {method}")
    wall_s = time.perf_counter() - t0
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method,
        "frames": frames,
        "wall_s": wall_s,
        "peak_rss_mib": rss_kib / 1024,
        "rss_after_imports_mib": base_rss / 1024,
        "mlx_peak_mib": mx.get_peak_memory() / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hours", type=float, default=3.0, help="length of the long file")
    p.add_argument("--methods", default="stream,log_mel,mlx_whisper", help="comma-separated")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    with tempfile.TemporaryDirectory(prefix="mel_memory_") as tmp:
        short, long_ = Path(tmp) / "10min.wav", Path(tmp) / "long.wav"
        repeats = max(1, round(args.hours * 3600 / 601))
        build(short, 1)
        build(long_, repeats)
        print(f"files: 10 min (601 s) and {repeats} x 601 s = {repeats * 601 / 3600:.2f} h; CPU, fresh process each")
        print(f"{'method':12s} {'audio':>8s} {'frames':>9s} {'wall s':>7s} {'peak RSS MiB':>13s} {'MLX peak MiB':>13s}")
        rows = {}
        for method in args.methods.split(","):
            for label, path in (("10 min", short), (f"{args.hours:g} h", long_)):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", method, str(path)], capture_output=True, text=True
                )
                if out.returncode:
                    print(f"{method:12s} {label:>8s} failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows[(method, label)] = r
                print(
                    f"{method:12s} {label:>8s} {r['frames']:9d} {r['wall_s']:7.1f} "
                    f"{r['peak_rss_mib']:13.0f} {r['mlx_peak_mib']:13.0f}"
                )
            pair = [rows.get((method, "10 min")), rows.get((method, f"{args.hours:g} h"))]
            if all(pair):
                print(
                    f"{'':12s} long/short: peak RSS x{pair[1]['peak_rss_mib'] / pair[0]['peak_rss_mib']:.2f}, "
                    f"MLX peak x{pair[1]['mlx_peak_mib'] / max(pair[0]['mlx_peak_mib'], 1e-9):.2f}"
                )


if __name__ == "__main__":
    main()
