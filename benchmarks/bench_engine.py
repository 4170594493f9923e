"""Benchmark the batched engine against sequential mlx-whisper and lightning-whisper-mlx.

Same process, same device, same decoded audio array, same weights (the converted model, cast to
float32 on the CPU and float16 on a GPU) for every method. Each method: one warm-up run, then the
median of ``--runs`` timed runs (wall time from the audio array in to the text out, model already
loaded). Prints x real time, WER (jiwer, after Whisper's English normaliser) and MLX's peak memory.

    .venv/bin/python benchmarks/bench_engine.py --model tiny.en \\
        --audio ../shared/audio/longform/english_read_mix_concat.flac --json-out benchmarks/results/cpu.json

Methods (``--methods``, comma-separated): mlx-seq (mlx_whisper.transcribe, default options),
mlx-seq-words (the same, word_timestamps=True), lightning-12 / lightning-24 (lightning-whisper-mlx
0.0.10 at that batch size), engine (this engine, words off), engine-words (words on).
``--word-timing`` pairs the words of mlx-seq-words and engine-words and reports how far apart their
start times are; ``--long-s`` times the engine once on the audio tiled to that length and compares
its peak memory with the plain run's; ``--clips DIR`` compares many short files batched together
with the same audio as one long file.

Needs: jiwer, whisper-normalizer, and lightning-whisper-mlx==0.0.10 installed with --no-deps
(benchmarks/install_bench_deps.sh). This is a script, not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import difflib
import gc
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import engine  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from engine.audio import SAMPLE_RATE, load_audio  # noqa: E402
from engine.blas import blas_warning  # noqa: E402

ALL_METHODS = ("mlx-seq", "mlx-seq-words", "lightning-12", "lightning-24", "engine", "engine-words")
DEFAULT_METHODS = "mlx-seq,lightning-12,lightning-24,engine,engine-words"


@dataclass
class Result:
    method: str
    wall_s: list[float] = field(default_factory=list)
    audio_s: float = 0.0
    wer: float | None = None
    peak_bytes: int = 0
    batch_size: int | None = None
    text: str = ""
    words: list[tuple[str, float, float]] = field(default_factory=list)  # (word, start_s, end_s)
    error: str | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_s) if self.wall_s else float("nan")

    @property
    def x_real_time(self) -> float:
        return self.audio_s / self.median_s if self.wall_s else float("nan")

    def row(self) -> dict:
        return {
            "method": self.method,
            "x_real_time": round(self.x_real_time, 2),
            "median_wall_s": round(self.median_s, 3),
            "runs_s": [round(w, 3) for w in self.wall_s],
            "wer_percent": None if self.wer is None else round(100 * self.wer, 2),
            "peak_memory_gib": round(self.peak_bytes / 2**30, 3),
            "batch_size": self.batch_size,
            "error": self.error,
        }


# ---------------------------------------------------------------- text and WER


def normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    norm = normalizer()
    return jiwer.wer(norm(reference), norm(hypothesis) or "<empty>")


# ---------------------------------------------------------------- the same weights for everyone


def write_weights_folder(src: Path, dest: Path, dtype: mx.Dtype) -> Path:
    """config.json + weights.npz cast to ``dtype``: what mlx-whisper and lightning-whisper-mlx both load."""
    from mlx_whisper.whisper import ModelDimensions

    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    dims = {k: config[k] for k in ModelDimensions.__dataclass_fields__}
    (dest / "config.json").write_text(json.dumps(dims | {"model_type": "whisper"}))
    source = src / "weights.safetensors"
    weights = mx.load(str(source if source.exists() else src / "weights.npz"))
    cast = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    mx.savez(str(dest / "weights.npz"), **cast)
    return dest


def drop_models() -> None:
    """Forget every method's loaded model so the next method's peak memory counts only its own."""
    from engine.holder import release_model

    # (mlx_whisper's package attribute `transcribe` is the function, so look the modules up by name)
    for module_name in ("mlx_whisper.transcribe", "lightning_whisper_mlx.transcribe"):
        if module_name in sys.modules:
            holder = sys.modules[module_name].ModelHolder
            holder.model = holder.model_path = None
    release_model()
    gc.collect()
    mx.clear_cache()


# ---------------------------------------------------------------- methods: audio in, (text, words, batch) out


def _seq_words(result: dict) -> list[tuple[str, float, float]]:
    return [(w["word"], float(w["start"]), float(w["end"])) for s in result["segments"] for w in s.get("words", [])]


def run_method(method: str, audio: np.ndarray, *, folder: Path, model_name: str, fp16: bool, language: str | None):
    if method in ("mlx-seq", "mlx-seq-words"):
        import mlx_whisper

        words = method.endswith("words")
        r = mlx_whisper.transcribe(audio, path_or_hf_repo=str(folder), fp16=fp16, word_timestamps=words, language=language)
        return r["text"], _seq_words(r) if words else [], None
    if method.startswith("lightning-"):
        from lightning_whisper_mlx.transcribe import transcribe_audio as lightning

        batch = int(method.split("-")[1])
        r = lightning(audio, path_or_hf_repo=str(folder), batch_size=batch, fp16=fp16, language=language)
        return r["text"], [], batch
    if method in ("engine", "engine-words"):
        from engine.options import EngineOptions
        from engine.transcribe import transcribe_audio

        options = EngineOptions(word_timestamps=method.endswith("words"), language=language)
        t = transcribe_audio(audio, model_name=model_name, options=options)
        words = [(w.word, w.start_s, w.end_s) for s in t.segments for w in s.words]
        return t.text, words, t.timing.batch_size
    raise SystemExit(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")


def bench(method: str, audio: np.ndarray, reference: str | None, runs: int, warmup_s: float = 0, **kw) -> Result:
    result = Result(method, audio_s=len(audio) / SAMPLE_RATE)
    try:
        drop_models()
        warmup = audio[: int(warmup_s * SAMPLE_RATE)] if warmup_s else audio
        run_method(method, warmup, **kw)  # warm-up: loads the model, compiles kernels
        mx.reset_peak_memory()
        for _ in range(runs):
            started = time.perf_counter()
            text, words, batch = run_method(method, audio, **kw)
            result.wall_s.append(time.perf_counter() - started)
        result.peak_bytes = mx.get_peak_memory()
        result.text, result.words, result.batch_size = text, words, batch
        if reference is not None:
            result.wer = wer(reference, text)
    except ImportError as e:
        result.error = f"not installed: {e.name or e} (see benchmarks/install_bench_deps.sh)"
    print(format_row(result.row()), flush=True)
    return result


# ---------------------------------------------------------------- word timing (issue 4)


def _key(word: str) -> str:
    return re.sub(r"[^a-z0-9]", "", word.lower())


def compare_word_timing(sequential: list, ours: list) -> dict:
    """Pair the two word sequences by aligning their lowercase alphanumeric forms; compare start times."""
    a = [(k, s) for w, s, _ in sequential if (k := _key(w))]
    b = [(k, s) for w, s, _ in ours if (k := _key(w))]
    matcher = difflib.SequenceMatcher(a=[k for k, _ in a], b=[k for k, _ in b], autojunk=False)
    diffs = [abs(a[block.a + i][1] - b[block.b + i][1]) for block in matcher.get_matching_blocks() for i in range(block.size)]
    if not diffs:
        return {"paired_fraction": 0.0, "sequential_words": len(a), "engine_words": len(b)}
    return {
        "sequential_words": len(a),
        "engine_words": len(b),
        "paired": len(diffs),
        "paired_fraction": round(len(diffs) / max(1, len(a)), 4),
        "median_abs_start_diff_ms": round(1000 * float(np.median(diffs)), 1),
        "p95_abs_start_diff_ms": round(1000 * float(np.percentile(diffs, 95)), 1),
        "targets": "median <= 50 ms, p95 <= 200 ms, paired >= 0.90",
    }


# ---------------------------------------------------------------- long file and many clips (issue 4)


def engine_once(
    audio_or_audios, model_name: str, words: bool, language: str | None, batch_size: int = 0
) -> tuple[float, int]:
    from engine.options import EngineOptions
    from engine.transcribe import transcribe_audio, transcribe_many

    options = EngineOptions(word_timestamps=words, language=language, batch_size=batch_size)
    mx.clear_cache()
    mx.reset_peak_memory()
    started = time.perf_counter()
    if isinstance(audio_or_audios, list):
        transcribe_many(audio_or_audios, model_name=model_name, options=options)
    else:
        transcribe_audio(audio_or_audios, model_name=model_name, options=options)
    return time.perf_counter() - started, mx.get_peak_memory()


def long_file_memory(
    audio: np.ndarray, long_s: float, model_name: str, words: bool, language: str | None, fixed_batch: int
) -> dict:
    """Peak memory of the audio vs the audio tiled to long_s, at the auto batch and at a fixed batch.

    At the auto batch a 10-minute file may not fill the batch (e.g. 24 regions for 64 rows) while
    a 3-hour file does, so that ratio measures batch fill; at a batch the short file fills too, it
    shows whether anything grows with the file's length.
    """
    from engine.holder import get_model
    from engine.memory import plan_batch

    reps = int(np.ceil(long_s * SAMPLE_RATE / len(audio)))
    long_audio = np.tile(audio, reps)[: int(long_s * SAMPLE_RATE)]
    loaded = get_model(model_name)
    budget = plan_batch(loaded.dims, loaded.dtype, batch_size=0, word_timestamps=words).budget_bytes
    engine_once(audio[: 60 * SAMPLE_RATE], model_name, words, language)  # warm-up
    out: dict = {"short_audio_s": round(len(audio) / SAMPLE_RATE, 1), "long_audio_s": round(len(long_audio) / SAMPLE_RATE, 1),
                 "auto_budget_gib": round(budget / 2**30, 3)}
    for label, batch in (("auto", 0), (f"batch{fixed_batch}", fixed_batch)):
        short_wall, short_peak = engine_once(audio, model_name, words, language, batch)
        long_wall, long_peak = engine_once(long_audio, model_name, words, language, batch)
        out[label] = {
            "short_peak_gib": round(short_peak / 2**30, 3),
            "short_x_real_time": round(len(audio) / SAMPLE_RATE / short_wall, 1),
            "long_peak_gib": round(long_peak / 2**30, 3),
            "long_x_real_time": round(len(long_audio) / SAMPLE_RATE / long_wall, 1),
            "peak_ratio": round(long_peak / max(1, short_peak), 3),
        }
    out["long_peak_within_auto_budget"] = out["auto"]["long_peak_gib"] <= out["auto_budget_gib"]
    out["target"] = "peak_ratio <= 1.3 (at a batch both fill); peak within the budget the engine chose"
    return out


def clips_throughput(clip_dir: Path, count: int, model_name: str, words: bool, language: str | None) -> dict:
    paths = sorted(p for ext in ("wav", "flac") for p in clip_dir.rglob(f"*.{ext}"))
    clips = [load_audio(p) for p in paths]
    clips = [c for c in clips if 3 * SAMPLE_RATE <= len(c) <= 30 * SAMPLE_RATE]
    if not clips:
        return {"error": f"no 3-30 s clips under {clip_dir}"}
    batch = [clips[i % len(clips)] for i in range(count)]
    joined = np.concatenate(batch)
    audio_s = len(joined) / SAMPLE_RATE
    engine_once(batch[:4], model_name, words, language)  # warm-up
    many_wall, _ = engine_once(batch, model_name, words, language)
    one_wall, _ = engine_once(joined, model_name, words, language)
    return {
        "clips": count,
        "audio_s": round(audio_s, 1),
        "clips_x_real_time": round(audio_s / many_wall, 1),
        "one_file_x_real_time": round(audio_s / one_wall, 1),
        "slowdown": round(many_wall / one_wall, 3),
        "target": "slowdown <= 1.5",
    }


# ---------------------------------------------------------------- main


def format_row(row: dict) -> str:
    if row["error"]:
        return f"{row['method']:<14} skipped: {row['error']}"
    wer_text = "-" if row["wer_percent"] is None else f"{row['wer_percent']:.2f} %"
    batch = "" if row["batch_size"] is None else f"batch {row['batch_size']}"
    return (
        f"{row['method']:<14} {row['x_real_time']:>8.1f}x  WER {wer_text:>8}  peak {row['peak_memory_gib']:6.2f} GiB"
        f"  median {row['median_wall_s']:7.2f} s  {batch}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny.en", help="model name / folder for every method (default tiny.en)")
    p.add_argument("--audio", action="append", type=Path, required=True, help="audio file; repeat to concatenate")
    p.add_argument("--max-s", type=float, default=0, help="use only the first N seconds of the audio (no WER: the reference can't be cut)")
    p.add_argument("--repeat", type=int, default=1, help="repeat the concatenated audio (and reference) N times")
    p.add_argument("--reference", action="append", type=Path, help="reference text(s); default: the .txt beside each audio")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {', '.join(ALL_METHODS)}")
    p.add_argument("--runs", type=int, default=3, help="timed runs per method (median reported)")
    p.add_argument("--warmup-s", type=float, default=0, help="warm up on the first N seconds only (default: the whole audio)")
    p.add_argument("--language", default=None, help="force a language for every method (default: each detects)")
    p.add_argument("--word-timing", action="store_true", help="also run mlx-seq-words and engine-words and compare word start times")
    p.add_argument("--long-s", type=float, default=0, help="tile the audio to this many seconds and compare the engine's peak memory")
    p.add_argument("--long-batch-size", type=int, default=16, help="the fixed batch for --long-s's second comparison")
    p.add_argument("--clips", type=Path, help="folder of short clips: many-files batching vs one long file")
    p.add_argument("--clips-count", type=int, default=200)
    p.add_argument("--json-out", type=Path, help="write every number here as JSON")
    args = p.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.word_timing:
        methods += [m for m in ("mlx-seq-words", "engine-words") if m not in methods]
    audio = np.concatenate([load_audio(a) for a in args.audio])
    audio = np.tile(audio, args.repeat) if args.repeat > 1 else audio
    if args.max_s:
        audio = audio[: int(args.max_s * SAMPLE_RATE)]
    refs = args.reference or [a.with_suffix(".txt") for a in args.audio]
    reference = None
    if all(r.exists() for r in refs) and not args.max_s:
        reference = " ".join([" ".join(r.read_text().strip() for r in refs)] * args.repeat)

    from engine.holder import default_dtype, device_name, get_model

    model_folder = get_model(args.model).path  # converts on first use; the methods load their own copies
    dtype = default_dtype()
    device = device_name()
    fp16 = dtype == mx.float16
    header = {
        "model": args.model,
        "dtype": str(dtype),
        "device": device,
        "machine": platform.machine(),
        "mlx": mx.__version__,
        "audio": [str(a) for a in args.audio],
        "repeat": args.repeat,
        "audio_s": round(len(audio) / SAMPLE_RATE, 1),
        "reference_words": len(reference.split()) if reference else None,
        "runs": args.runs,
        "warmup_s": args.warmup_s or None,
        "blas_warning": blas_warning(),
    }
    print(json.dumps(header))
    out: dict = {"header": header, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_weights_folder(model_folder, Path(tmp) / "weights", dtype)
        kw = dict(folder=folder, model_name=args.model, fp16=fp16, language=args.language)
        results = {m: bench(m, audio, reference, args.runs, args.warmup_s, **kw) for m in methods}
    out["results"] = [r.row() for r in results.values()]

    seq = results.get("mlx-seq")
    for name, r in results.items():
        if seq and seq.wall_s and r.wall_s and name != "mlx-seq":
            print(f"  {name}: {r.x_real_time / seq.x_real_time:.2f}x mlx-seq's speed, WER {100 * ((r.wer or 0) - (seq.wer or 0)):+.2f} points")
    if "mlx-seq-words" in results and "engine-words" in results and results["engine-words"].wall_s:
        timing = compare_word_timing(results["mlx-seq-words"].words, results["engine-words"].words)
        out["word_timing"] = timing
        print("word timing vs mlx-seq-words:", json.dumps(timing))
    if args.long_s:
        drop_models()
        out["long_file"] = long_file_memory(audio, args.long_s, args.model, False, args.language, args.long_batch_size)
        print("long file:", json.dumps(out["long_file"]))
    if args.clips:
        drop_models()
        out["clips"] = clips_throughput(args.clips, args.clips_count, args.model, False, args.language)
        print("clips:", json.dumps(out["clips"]))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
