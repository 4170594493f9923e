"""Host-side cost of one round's input: reading 64 windows of the files' stored log-mel, clamping
and normalising them, and handing the batch to MLX. The driver thread does this between the
device's rounds, so every millisecond here is a millisecond the card waits (H200, base, 64 rows:
~0.06 s between rounds in the engine alone, ~0.8 s a round).

    .venv/bin/python benchmarks/bench_round_input.py [--rows 64] [--trials 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_whisper.audio import N_FRAMES  # noqa: E402

from engine.mel import DYNAMIC_RANGE, FileMel  # noqa: E402
from engine.session import RoundInput  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = 30_000  # 5 minutes of frames a file
    mels = [FileMel(log10=rng.standard_normal((n, 80)).astype(np.float32), content_frames=n, max_log10=2.0,
                    energy=np.zeros(n, np.float32), flat=np.zeros(n, bool)) for _ in range(args.rows)]
    seeks = rng.integers(0, n - 3000, size=(args.trials, args.rows))

    def old_window(m: FileMel, seek: int) -> np.ndarray:  # FileMel.window before window_into
        size = max(0, min(N_FRAMES, n - seek, m.content_frames - seek))
        out = np.zeros((N_FRAMES, m.log10.shape[1]), np.float32)
        out[:size] = (np.maximum(m.log10[seek : seek + size], m.max_log10 - DYNAMIC_RANGE) + 4.0) / 4.0
        return out

    def old(k: int) -> mx.array:  # as the session did before RoundInput
        return mx.array(np.stack([old_window(m, int(s)) for m, s in zip(mels, seeks[k])]))

    batch = RoundInput(80)

    def new(k: int) -> mx.array:
        for i, (m, s) in enumerate(zip(mels, seeks[k])):
            m.window_into(batch.row(i), int(s), n)
        return batch.to_mlx(args.rows)

    for k in range(args.trials):  # the same values both ways
        assert np.array_equal(np.array(old(k)), np.array(new(k)))
    for _ in range(2):
        for name, fn in (("windows + np.stack + mx.array", old), ("into one reused buffer + mx.array", new)):
            ms = []
            for k in range(args.trials):
                t0 = time.perf_counter()
                mx.eval(fn(k))
                ms.append(1000 * (time.perf_counter() - t0))
            print(f"{name:>34}: {statistics.median(ms):.1f} ms median, {min(ms):.1f} fastest ({args.rows} rows)", flush=True)


if __name__ == "__main__":
    main()
