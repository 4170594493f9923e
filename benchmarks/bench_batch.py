"""What a batch row costs on this device: encode and one-token decoding steps per batch size.

    .venv/bin/python benchmarks/bench_batch.py --model base --batches 32,64,128,192 --json-out batch.json

Fixed work, real weights, real audio: windows of the first long file (repeated as needed) encoded
together, then exactly ``--steps`` greedy steps for every row through the engine's batched decoder
(engine.decode._Decoder). No end-of-text stop, no fallback, no words: this isolates what the batch
size changes, to choose engine.memory's cap on rows. Per batch it reports ms per encoded window,
ms per decoding step, and windows per second of decoding at ``--steps`` tokens a window (Whisper's
windows average about 100). One untimed pass per shape first (kernel compilation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import engine  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from engine.audio import load_audio  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "audio"
LONG_FILE = "longform/english_read_mix_concat.flac"
GIB = 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--batches", default="16,32,64")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--audio", type=Path, default=SHARED / LONG_FILE)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    from mlx_whisper.audio import N_FRAMES

    from engine.decode import _Decoder
    from engine.holder import device_name, get_model
    from engine.mel import file_mel

    loaded = get_model(args.model)
    model, dtype = loaded.model, loaded.dtype
    batches = [int(b) for b in args.batches.split(",")]
    audio = load_audio(args.audio)
    mel = file_mel([audio], loaded.dims.n_mels)
    n_windows = max(1, mel.content_frames // N_FRAMES)
    windows = [mx.array(mel.window((i % n_windows) * N_FRAMES, mel.content_frames)[0]) for i in range(max(batches))]
    sot = list(loaded.tokenizer().sot_sequence)

    def once(n: int) -> tuple[float, float]:
        mels = mx.stack(windows[:n]).astype(dtype)
        mx.eval(mels)
        t0 = time.perf_counter()
        features = model.encoder(mels)
        mx.eval(features)
        t1 = time.perf_counter()
        decoder = _Decoder(model, features, mx.zeros((n,), mx.int32), loaded.dims.n_text_ctx)
        logits = decoder.logits(decoder(mx.array([sot] * n))[:, -1])
        mx.eval(logits, decoder.keys, decoder.values)
        t2 = time.perf_counter()
        for step in range(args.steps):
            token = mx.argmax(logits, axis=-1).astype(mx.int32)
            logits = decoder.logits(decoder(token[:, None])[:, -1])
            mx.async_eval(logits)
            if step % 8 == 7:  # the engine's loop checks for the end every 8 steps
                mx.eval(logits)
        mx.eval(logits)
        return t1 - t0, time.perf_counter() - t2

    rows = []
    for n in batches:
        once(n)  # kernels for this shape
        mx.reset_peak_memory()
        encode_s, decode_s = once(n)
        step_ms = decode_s / args.steps * 1e3
        row = {"batch": n, "encode_ms_per_window": round(encode_s / n * 1e3, 2),
               "step_ms": round(step_ms, 3), "step_ms_per_row": round(step_ms / n, 4),
               "decode_windows_per_s": round(n / decode_s, 1), "peak_gib": round(mx.get_peak_memory() / GIB, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": device_name(), "model": loaded.name, "dtype": str(dtype).removeprefix("mlx.core."),
              "steps": args.steps, "rows": rows}
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
