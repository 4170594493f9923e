"""What quantised models cost and buy: WER, speed, peak memory and size, full precision vs 8 and 4 bits.

    .venv/bin/python benchmarks/bench_quant.py --models tiny.en,base --json-out quant.json
    .venv/bin/python benchmarks/build_archive.py --out /tmp/qarch --tilings 0 --english-only
    .venv/bin/python benchmarks/bench_quant.py --models tiny.en --archive /tmp/qarch --json-out quant.json

For each model of ``--models`` and each variant of ``--variants`` (full, 8, 4, or bits and a
group size other than the default: 8-g128, and the encoder's own: 8-e32; a missing
``MODEL-q8``/``MODEL-q4``/``MODEL-q8-g128``/``MODEL-q8-e32`` is quantised into the model store
first, as `archive-asr models quantize` does), with word timestamps on, through the engine
(engine.transcribe / engine.session):

- each long file of ``--long-files`` alone: WER (Whisper's English normaliser, via
  bench_archive.errors), x real time (after a 40 s warm-up), MLX peak memory at the automatic batch;
- ``--fixed-batch`` (default 8) windows of the first long file as that many 30 s files, at that
  batch size: peak memory with the same rows for every variant, so weights + rows compare fairly;
- with ``--archive`` (a folder made by build_archive.py): every file at once, WER per set as
  bench_archive reports it, x real time and peak memory;
- weights: MLX active memory the loaded model takes (float32 on the CPU, float16 on a GPU), the
  same weights in float16 by engine.memory.weights_bytes (what the issue's targets compare), and
  the model folder's size on disk.

``--turbo-windows N`` (0 = skip) adds large-v3-turbo's shapes with RANDOM weights, full vs 8 vs 4
bits: SPEED AND MEMORY ONLY, NO WER (random weights decode garbage). Its work is fixed so the
variants do the same: N windows of the first long file encoded in one batch, then exactly
``--turbo-tokens`` greedy steps per window through the engine's batched decoder (engine.decode's
_Decoder: preallocated caches, one step for every row), no end-of-text stop, no fallback, no word
timing. x real time there = N x 30 s / (encode + decode seconds). On a GPU one untimed pass runs
first (kernel compilation); on the CPU the one pass is the timed one.

Needs jiwer and whisper-normalizer (benchmarks/install_bench_deps.sh). No network: models come
from the bundled packages or the model store.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench_archive import errors, run_engine, wer_table  # noqa: E402
from bench_engine import drop_models  # noqa: E402
from engine.audio import SAMPLE_RATE, load_audio  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "audio"
LONG_NAMES = ("longform/english_read_mix_concat.flac", "longform/english_read2_concat.flac")
WINDOW_S = 30
WARMUP_S = 40
GIB = 1 << 30
TURBO = dict(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
             n_vocab=51866, n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=4)
SPEED_ONLY = "speed and memory only, no WER (random weights)"


def variant_model(model: str, variant: str) -> str:
    """The store name of a variant ("full", "8", "4", "8-g128": bits and a group size, "8-e32": the
    encoder's own group size), quantising it into the store if missing."""
    if variant == "full":
        return model
    from engine.quantize import Quantization, quantize_model
    from engine.variants import DEFAULT_GROUP_SIZE

    variant, _, encoder = variant.partition("-e")
    bits, _, group_size = variant.partition("-g")
    quantization = Quantization(int(bits), int(group_size or DEFAULT_GROUP_SIZE), int(encoder) if encoder else None)
    dest, made = quantize_model(model, quantization)
    if made:
        print(f"quantised {model} -> {dest.name}", flush=True)
    return dest.name


def _released() -> None:
    drop_models()
    gc.collect()
    mx.clear_cache()


def weights_figures(name: str) -> dict:
    """Memory the loaded weights take here, their float16 size, and the folder's size on disk."""
    from engine.holder import get_model
    from engine.memory import weights_bytes
    from engine.model_store import size_on_disk

    _released()
    before = mx.get_active_memory()
    loaded = get_model(name)
    return {
        "bits": loaded.quantization["bits"] if loaded.quantization else 16,
        "dtype": str(loaded.dtype).removeprefix("mlx.core."),
        "weights_loaded_mib": round((mx.get_active_memory() - before) / 2**20, 1),
        "weights_float16_mib": round(weights_bytes(loaded.dims, 2, loaded.quantization) / 2**20, 1),
        "size_on_disk_mib": round(size_on_disk(loaded.path) / 2**20, 1),
    }


def _transcribe(audios: list[np.ndarray], name: str, batch_size: int = 0, min_region_s: float | None = None):
    from engine.options import EngineOptions
    from engine.transcribe import transcribe_many

    options = EngineOptions(word_timestamps=True, batch_size=batch_size)
    return transcribe_many(audios, model_name=name, options=options, min_region_s=min_region_s)


def long_file(path: Path, name: str, min_region_s: float | None) -> dict:
    audio = load_audio(path)
    reference = path.with_suffix(".txt").read_text()
    _transcribe([audio[: WARMUP_S * SAMPLE_RATE]], name, min_region_s=min_region_s)  # loads, compiles
    mx.clear_cache()
    mx.reset_peak_memory()
    started = time.perf_counter()
    [t] = _transcribe([audio], name, min_region_s=min_region_s)
    wall = time.perf_counter() - started
    err, n = errors(reference, t.text, "en")
    return {"wer_percent": round(100 * err / n, 2), "errors": err, "reference_words": n,
            "x_real_time": round(len(audio) / SAMPLE_RATE / wall, 1), "wall_s": round(wall, 1),
            "peak_gib": round(mx.get_peak_memory() / GIB, 3), "batch_size": t.timing.batch_size, "text": t.text}


def fixed_batch(path: Path, name: str, batch_size: int) -> dict:
    """batch_size 30 s pieces at batch_size rows: the same rows for every variant."""
    audio = load_audio(path)
    window = WINDOW_S * SAMPLE_RATE
    pieces = [audio[i * window : (i + 1) * window] for i in range(batch_size)]
    _transcribe(pieces[:1], name, batch_size=batch_size)
    mx.clear_cache()
    mx.reset_peak_memory()
    started = time.perf_counter()
    out = _transcribe(pieces, name, batch_size=batch_size)
    wall = time.perf_counter() - started
    return {"batch_size": batch_size, "rows_used": out[0].timing.batch_size, "peak_gib": round(mx.get_peak_memory() / GIB, 3),
            "x_real_time": round(batch_size * WINDOW_S / wall, 1)}


def archive_run(folder: Path, name: str, batch_size: int) -> dict:
    from engine.holder import get_model

    manifest = json.loads((folder / "manifest.json").read_text())
    if not get_model(name).is_multilingual:
        manifest["files"] = [f for f in manifest["files"] if f["language"] == "en"]
        manifest["sets"] = {k: s for k, s in manifest["sets"].items() if s["language"] == "en"}
    audios = {f["path"]: load_audio(folder / f["path"]) for f in manifest["files"]}
    audio_s = sum(len(a) for a in audios.values()) / SAMPLE_RATE
    run_engine({"warm": next(iter(audios.values()))[: WARMUP_S * SAMPLE_RATE]}, name, True, batch_size, None)
    mx.clear_cache()
    mx.reset_peak_memory()
    out, wall, extra = run_engine(audios, name, True, batch_size, None)
    return {"files": len(audios), "audio_s": round(audio_s, 1), "x_real_time": round(audio_s / wall, 1),
            "wall_s": round(wall, 1), "peak_gib": round(mx.get_peak_memory() / GIB, 3), **extra,
            "wer": wer_table(manifest, {p: o["text"] for p, o in out.items()})}


# ---------------------------------------------------------------- large-v3-turbo shapes, random weights


def turbo_run(variant: str, windows: int, tokens: int, audio_path: Path) -> dict:
    """Encode ``windows`` windows and greedily decode exactly ``tokens`` tokens each, random weights."""
    from mlx_whisper.audio import N_FRAMES
    from mlx_whisper.tokenizer import get_tokenizer
    from mlx_whisper.whisper import ModelDimensions, Whisper

    from engine.decode import _Decoder
    from engine.holder import default_dtype
    from engine.mel import file_mel
    from engine.quantize import Quantization, quantize_in_place

    _released()
    dims = ModelDimensions(**TURBO)
    dtype = default_dtype()
    mx.random.seed(0)
    before = mx.get_active_memory()
    model = Whisper(dims, dtype)  # mlx's default initialisation: random, of Whisper's scale
    if variant != "full":
        quantize_in_place(model, Quantization(int(variant)))
        if mx.default_device() == mx.cpu:
            from engine.cpu_quantized import use_cpu_layers

            use_cpu_layers(model)
    mx.eval(model.parameters())
    gc.collect()
    mx.clear_cache()
    weights = mx.get_active_memory() - before

    audio = load_audio(audio_path)[: windows * WINDOW_S * SAMPLE_RATE]
    mel = file_mel([audio], dims.n_mels)
    mels = mx.stack([mx.array(mel.window(i * N_FRAMES, N_FRAMES)[0]) for i in range(windows)]).astype(dtype)
    tokenizer = get_tokenizer(multilingual=True, num_languages=100, language="en", task="transcribe")
    prompt = mx.array([list(tokenizer.sot_sequence)] * windows)  # (windows, 4)

    def once() -> tuple[float, float]:
        started = time.perf_counter()
        features = model.encoder(mels)  # (windows, n_audio_ctx, n_audio_state)
        mx.eval(features)
        encoded = time.perf_counter()
        decoder = _Decoder(model, features, mx.zeros((windows,), mx.int32), prompt.shape[1] + tokens)
        hidden = decoder(prompt)
        for _ in range(tokens):
            token = mx.argmax(decoder.logits(hidden[:, -1]), axis=-1)  # (windows,)
            hidden = decoder(token[:, None])
        mx.eval(hidden)
        return encoded - started, time.perf_counter() - encoded

    if mx.default_device() == mx.gpu:
        once()  # warm-up: compiles the GPU kernels (the CPU has none to compile, and one pass there is minutes)
    mx.clear_cache()
    mx.reset_peak_memory()
    encode_s, decode_s = once()
    row = {"variant": variant, "label": SPEED_ONLY, "dtype": str(dtype).removeprefix("mlx.core."), "windows": windows,
           "tokens_per_window": tokens, "weights_loaded_mib": round(weights / 2**20, 1),
           "encode_s": round(encode_s, 2), "decode_s": round(decode_s, 2),
           "decode_tokens_per_s": round(windows * tokens / decode_s, 1),
           "x_real_time": round(windows * WINDOW_S / (encode_s + decode_s), 2), "peak_gib": round(mx.get_peak_memory() / GIB, 3)}
    del model
    return row


# ---------------------------------------------------------------- main


def table(results: dict) -> str:
    lines = [f"{'model':<12} {'bits':>4} {'disk MiB':>8} {'weights MiB':>11} {'f16 MiB':>8} "
             + " ".join(f"{'WER ' + k:>11} {'xRT':>6} {'peak GiB':>8}" for k in results["long_file_names"])
             + f" {'peak@batch':>10} {'arch WER':>9} {'arch xRT':>8}"]
    for r in results["variants"]:
        cells = [f"{r['name']:<12} {r['bits']:>4} {r['size_on_disk_mib']:>8} {r['weights_loaded_mib']:>11} {r['weights_float16_mib']:>8}"]
        for k in results["long_file_names"]:
            f = r["long_files"].get(k)
            cells.append(f"{f['wer_percent']:>11} {f['x_real_time']:>6} {f['peak_gib']:>8}" if f else f"{'-':>11} {'-':>6} {'-':>8}")
        fb = r.get("fixed_batch")
        cells.append(f"{fb['peak_gib'] if fb else '-':>10}")
        a = r.get("archive")
        cells.append(f"{a['wer']['overall-en'] if a else '-':>9} {a['x_real_time'] if a else '-':>8}")
        lines.append(" ".join(cells))
    if results.get("turbo"):
        lines.append(f"\nlarge-v3-turbo shapes, {SPEED_ONLY}:")
        lines.append(f"{'variant':<8} {'weights MiB':>11} {'encode s':>9} {'decode s':>9} {'tok/s':>7} {'xRT':>6} {'peak GiB':>8}")
        for t in results["turbo"]:
            lines.append(f"{t['variant']:<8} {t['weights_loaded_mib']:>11} {t['encode_s']:>9} {t['decode_s']:>9} "
                         f"{t['decode_tokens_per_s']:>7} {t['x_real_time']:>6} {t['peak_gib']:>8}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny.en,base", help="comma-separated models at full precision")
    ap.add_argument("--variants", default="full,8,4", help="comma-separated: full, 8, 4, or bits and a group size (8-g128), the encoder's own (8-e32)")
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared audio folder (long files, turbo audio)")
    ap.add_argument("--long-files", default=",".join(LONG_NAMES), help="comma-separated, under --shared or absolute; '' = none")
    ap.add_argument("--min-region-s", type=float, default=None, help="cut a lone long file into stretches of at least this (default: never)")
    ap.add_argument("--fixed-batch", type=int, default=8, help="rows for the equal-batch peak memory run; 0 = skip")
    ap.add_argument("--archive", type=Path, default=None, help="a folder made by build_archive.py (optional)")
    ap.add_argument("--archive-models", default="", help="models that run the archive (default: all of --models)")
    ap.add_argument("--batch-size", type=int, default=0, help="archive batch rows; 0 = the engine's choice")
    ap.add_argument("--turbo-windows", type=int, default=0, help="large-v3-turbo shapes, random weights: windows; 0 = skip")
    ap.add_argument("--turbo-tokens", type=int, default=32, help="greedy steps per window in the turbo run")
    ap.add_argument("--turbo-variants", default="full,8,4", help="comma-separated variants of the turbo run: full, 8, 4")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    from engine.holder import device_name

    long_files = [args.shared / p for p in args.long_files.split(",") if p]  # an absolute path stays itself
    archive_models = set(args.archive_models.split(",")) if args.archive_models else None
    results: dict = {"device": device_name(), "platform": platform.platform(), "mlx": mx.__version__,
                     "long_file_names": [p.stem for p in long_files], "fixed_batch": args.fixed_batch,
                     "min_region_s": args.min_region_s,
                     "words": True, "variants": [], "turbo": []}

    def save() -> None:
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=1, ensure_ascii=False))

    for model in args.models.split(","):
        for variant in args.variants.split(","):
            name = variant_model(model, variant)
            row = {"model": model, "variant": variant, "name": name, **weights_figures(name), "long_files": {}}
            print(name, json.dumps(row), flush=True)
            for path in long_files:
                row["long_files"][path.stem] = long_file(path, name, args.min_region_s)
                print(name, path.stem, json.dumps({k: v for k, v in row["long_files"][path.stem].items() if k != "text"}), flush=True)
            if args.fixed_batch and long_files:
                row["fixed_batch"] = fixed_batch(long_files[0], name, args.fixed_batch)
                print(name, "fixed batch", json.dumps(row["fixed_batch"]), flush=True)
            if args.archive and (archive_models is None or model in archive_models):
                row["archive"] = archive_run(args.archive, name, args.batch_size)
                print(name, "archive", json.dumps(row["archive"]), flush=True)
            results["variants"].append(row)
            save()
            _released()

    if args.turbo_windows:
        for variant in args.turbo_variants.split(","):
            results["turbo"].append(turbo_run(variant, args.turbo_windows, args.turbo_tokens, args.shared / LONG_NAMES[0]))
            print("large-v3-turbo shapes", json.dumps(results["turbo"][-1]), flush=True)
            save()
    save()
    print()
    print(table(results))


if __name__ == "__main__":
    main()
