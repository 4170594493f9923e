"""Archive mode against sequential Whisper, file by file, on the same arrays and the same weights.

    .venv/bin/python benchmarks/build_archive.py --out /tmp/archive --tilings 9
    .venv/bin/python benchmarks/bench_archive.py --archive /tmp/archive --model base --json-out gpu_archive.json

Methods (``--methods``): seq and seq-words (mlx_whisper.transcribe on each file in turn, default
options, without and with word timestamps), engine and engine-words (one engine session, every
file submitted at once: files are the batch rows). Each method gets one warm-up on a short file.
An engine method may name its batch size, to compare several in one process: ``engine-words:b128``.
Reported, per method: x real time (all the archive's audio / wall time, the model loaded),
WER per set (a long file's pieces joined in order against its reference) and overall; for
the engine, how far its text is from sequential's (the sequential text as the reference:
the share of words that differ) and how far its word starts are from sequential's.

``--shard I/N`` runs the methods on every N-th file only (by length, so shards are even): sequential
Whisper over a big archive split across GPUs, one process per card. ``--reuse a.json,b.json``
takes the outputs of earlier runs (shards are merged; a sequential method's x real time is then
the audio over the sum of its files' times), runs only the methods still missing and compares.

``--lone`` also runs each English long file alone through the engine, with
``--min-region-s`` values (the shortest stretch a lone file is cut into to fill idle rows),
against sequential on that file (from the archive run). ``--lone-sets`` names other sets whose
files run alone, one after another (a tiling's pieces: many cut placements where one file gives
few); ``--sets`` keeps only some sets' files (sequential on the long files alone, say).

A script that prints numbers, not a test. Needs jiwer and whisper-normalizer
(benchmarks/install_bench_deps.sh).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from bench_engine import drop_models, write_weights_folder  # noqa: E402
from compare_words import pair_words  # noqa: E402
from engine.audio import SAMPLE_RATE, load_audio  # noqa: E402
from engine.options import EngineOptions  # noqa: E402

METHODS = ("seq", "seq-words", "engine", "engine-words")
NO_SPACE = {"zh", "ja", "ko", "th"}  # scored by characters


# ---------------------------------------------------------------- text


def _normalise(text: str, language: str) -> list[str]:
    if language == "en":
        from whisper_normalizer.english import EnglishTextNormalizer

        words = EnglishTextNormalizer()(text).split()
    else:
        from whisper_normalizer.basic import BasicTextNormalizer

        norm = BasicTextNormalizer()(text)
        words = list(norm.replace(" ", "")) if language in NO_SPACE else norm.split()
    return words


def errors(reference: str, hypothesis: str, language: str) -> tuple[int, int]:
    """(word errors, reference words) after Whisper's normaliser."""
    import jiwer

    ref, hyp = _normalise(reference, language), _normalise(hypothesis, language)
    if not ref:
        return len(hyp), 0
    out = jiwer.process_words(" ".join(ref), " ".join(hyp) or "<empty>")
    return out.substitutions + out.deletions + out.insertions, len(ref)


def set_wer(manifest: dict, texts: dict[str, str], names) -> tuple[float, int, int]:
    """Corpus WER over the sets named: each set's files joined in order against its reference."""
    err = n = 0
    for name in names:
        s = manifest["sets"][name]
        hyp = " ".join(texts[p] for p in s["files"])
        e, r = errors(s["reference"], hyp, s["language"])
        err, n = err + e, n + r
    return (err / n if n else float("nan")), err, n


# ---------------------------------------------------------------- methods


def run_sequential(audios: dict[str, np.ndarray], languages: dict[str, str], folder: Path, fp16: bool, words: bool, multilingual: bool):
    import mlx_whisper

    out, wall = {}, 0.0
    for path, audio in audios.items():
        t0 = time.perf_counter()
        r = mlx_whisper.transcribe(audio, path_or_hf_repo=str(folder), fp16=fp16, word_timestamps=words,
                                   language=None if multilingual else "en")
        took = time.perf_counter() - t0
        wall += took
        out[path] = {
            "wall_s": took,
            "text": r["text"],
            "language": r["language"],
            "words": [(w["word"], float(w["start"]), float(w["end"])) for s in r["segments"] for w in s.get("words", [])],
        }
    return out, wall


def memory_view() -> dict:
    """What the batch plan sees (the device's free memory, MLX's active and cached buffers) and, on
    CUDA, the driver's memory pool and what nvidia-smi says each process holds: a second session in
    one process planned 18 rows where the first planned 64, the memory it missed held by the pool."""
    from engine.memory import device_memory

    mem = device_memory()
    out = {"available_gib": round(mem.available_bytes / 2**30, 2), "total_gib": round(mem.total_bytes / 2**30, 2),
           "mlx_active_gib": round(mx.get_active_memory() / 2**30, 2), "mlx_cache_gib": round(mx.get_cache_memory() / 2**30, 2)}
    info = mx.device_info()
    if "free_memory" in info:
        from engine import cuda_pool

        out["cuda_free_gib"] = round(int(info["free_memory"]) / 2**30, 2)
        if pool := cuda_pool.pool_bytes():
            out["cuda_pool_reserved_gib"], out["cuda_pool_used_gib"] = (round(b / 2**30, 2) for b in pool)
        out["mlx_memory_limit_gib"] = round(mx.get_memory_limit() / 2**30, 2)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            out["nvidia_smi_apps"] = smi.stdout.strip().splitlines()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return out


def engine_variant(method: str, batch_size: int) -> tuple[int, bool]:
    """"engine-words:b128:paths" -> (128, True): one engine variant's batch size, and whether it is
    given the files' paths (decoded and their log-mel made in the session's preparing threads, as in
    a worker) rather than the arrays every method shares, so that several compare in one process."""
    paths = False
    for part in method.split(":")[1:]:
        if part == "paths":
            paths = True
        elif part.startswith("b") and part[1:].isdigit():
            batch_size = int(part[1:])
        else:
            raise SystemExit(f"{method}: unknown variant {part!r} (bN: N rows; paths: submit paths)")
    return batch_size, paths


def new_session(model_name: str, batch_size: int, min_region_s: float | None):
    from engine.session import MIN_REGION_S, Session

    session = Session(model_name, batch_size=batch_size, min_region_s=min_region_s or MIN_REGION_S)
    session.warm_up()  # as a worker does before its first job
    return session


def transcript_output(t) -> dict:
    return {"text": t.text, "language": t.language, "words": [(w.word, w.start_s, w.end_s) for s in t.segments for w in s.words]}


def run_engine(audios: dict[str, np.ndarray], model_name: str, words: bool, batch_size: int, min_region_s: float | None):
    print("memory before the session:", json.dumps(memory_view()), flush=True)
    session = new_session(model_name, batch_size, min_region_s)
    options = EngineOptions(word_timestamps=words)
    try:
        t0 = time.perf_counter()
        futures = {p: session.submit(a, options=options, key=p) for p, a in audios.items()}
        session.run_until_done(list(futures.values()))
        wall = time.perf_counter() - t0
    finally:
        session.close()
    print("memory after the session:", json.dumps(memory_view()), flush=True)
    out = {path: transcript_output(f.result()) for path, f in futures.items()}
    stats = session.stats
    return out, wall, {"rows": session.batch_size, "rounds": stats.rounds, "windows": stats.windows,
                       "redecoded": stats.redecoded, "splits": stats.splits, "idle_rows": stats.idle_rows,
                       "starved_rows": stats.starved_rows, "live_rows": stats.live_rows,
                       "round_start_ms": stats.round_start_ms, "round_ms": stats.round_ms,
                       "round_encode_ms": stats.round_encode_ms, "round_words_ms": stats.round_words_ms,
                       "encode_s": round(stats.encode_s, 2), "decode_s": round(stats.decode_s, 2),
                       "words_s": round(stats.words_s, 2), "read_s": round(stats.read_s, 2),
                       "prepare_decode_s": round(stats.prepare_decode_s, 2), "prepare_mel_s": round(stats.prepare_mel_s, 2)}


# ---------------------------------------------------------------- comparison


def exactness(manifest: dict, engine_out: dict, seq_out: dict) -> dict:
    """The engine's text scored against sequential's: the share of words that differ, overall and worst files."""
    langs = {f["path"]: f["language"] for f in manifest["files"]}
    err = n = 0
    per_file = []
    for path, s in seq_out.items():
        e, r = errors(s["text"], engine_out[path]["text"], langs[path])
        err, n = err + e, n + r
        per_file.append((e / r if r else float(e > 0), path))
    per_file.sort(reverse=True)
    return {
        "words_differ_percent": round(100 * err / max(1, n), 3),
        "files_identical": sum(1 for x, _ in per_file if x == 0),
        "files": len(per_file),
        "worst": [(p, round(100 * x, 2)) for x, p in per_file[:5]],
    }


def word_starts(seq_out: dict, engine_out: dict, paths=None) -> dict:
    diffs, n_ref = [], 0
    for path in paths or seq_out:
        pairs, n = pair_words(seq_out[path]["words"], engine_out[path]["words"])
        diffs += [abs(a[1] - b[1]) for a, b in pairs]
        n_ref += n
    if not diffs:
        return {}
    return {
        "paired_fraction": round(len(diffs) / max(1, n_ref), 4),
        "median_ms": round(1000 * float(np.median(diffs)), 1),
        "p95_ms": round(1000 * float(np.percentile(diffs, 95)), 1),
    }


def wer_table(manifest: dict, texts: dict[str, str]) -> dict:
    en_sets = [k for k, s in manifest["sets"].items() if s["language"] == "en"]
    out = {}
    for long_file in ("mix", "read2"):
        names = [k for k in en_sets if manifest["sets"][k].get("long_file") == long_file]
        if names:
            out[f"{long_file}-pieces"] = round(100 * set_wer(manifest, texts, names)[0], 2)
    for name in ("mix-whole", "read2-whole", "lj-whole"):
        if name in manifest["sets"]:
            out[name] = round(100 * set_wer(manifest, texts, [name])[0], 2)
    clips = [k for k in en_sets if k.startswith("clip-")]
    out["en-clips"] = round(100 * set_wer(manifest, texts, clips)[0], 2)
    out["overall-en"] = round(100 * set_wer(manifest, texts, en_sets)[0], 2)
    return out


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", type=Path, required=True, help="a folder made by build_archive.py")
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--min-region-s", type=float, default=None, help="cut files to fill idle rows, stretches of at least this (default: never)")
    ap.add_argument("--lone", default="", help="comma-separated min-region lengths for the lone runs")
    ap.add_argument("--lone-repeat", type=int, default=3, help="engine runs per lone long file and length (the median wall is reported)")
    ap.add_argument("--lone-words", default="off,on", help="word timestamps in the lone runs: off, on or off,on")
    ap.add_argument("--lone-sets", default="", help="comma-separated sets whose files run alone (default: the long files whole)")
    ap.add_argument("--sets", default="", help="comma-separated set names: only their files (e.g. mix-whole,read2-whole,lj-whole)")
    ap.add_argument("--limit-files", type=int, default=0, help="only the first N files (a quick look)")
    ap.add_argument("--sequential-from", "--reuse", dest="reuse", default="",
                    help="comma-separated --json-out files of earlier runs (or shards): their methods are not run again")
    ap.add_argument("--shard", default="", help="I/N: only every N-th file, by length (one of N processes)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each engine method this many times and report the fastest, all walls listed (MLX "
                         "compiles its CUDA kernels as it meets new shapes: on a fresh machine a first pass pays "
                         "~a minute; and a second session in one process ran slower, not faster, on an H200)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    from engine.holder import device_name, get_model

    manifest = json.loads((args.archive / "manifest.json").read_text())
    loaded = get_model(args.model)
    if not loaded.is_multilingual:
        manifest["files"] = [f for f in manifest["files"] if f["language"] == "en"]
        manifest["sets"] = {k: s for k, s in manifest["sets"].items() if s["language"] == "en"}
    if args.sets:
        keep = set(args.sets.split(","))
        manifest["sets"] = {k: s for k, s in manifest["sets"].items() if k in keep}
        wanted = {p for s in manifest["sets"].values() for p in s["files"]}
        manifest["files"] = [f for f in manifest["files"] if f["path"] in wanted]
    files = manifest["files"][: args.limit_files or None]
    if args.shard:
        i, n = (int(x) for x in args.shard.split("/"))
        files = sorted(files, key=lambda f: (-f["seconds"], f["path"]))[i::n]
    results: dict = {"device": device_name(), "platform": platform.platform(), "model": args.model,
                     "files": len(files), "audio_s": round(sum(f["seconds"] for f in files), 1), "methods": {}}
    outputs: dict = {}
    for earlier in filter(None, args.reuse.split(",")):  # deterministic methods measured once, reused
        merge_outputs(results, outputs, json.loads(Path(earlier).read_text()), earlier)
    methods = [m for m in args.methods.split(",") if m not in outputs]
    complete = all(f["path"] in out for out in outputs.values() for f in files)
    if not complete:
        print(f"warning: the reused outputs lack some of the {len(files)} files; WER is left out", flush=True)
    audios: dict = {}
    if methods or args.lone:
        audios, folder, warm, fp16 = load_archive(args, files, loaded)
        print(f"{len(audios)} files, {results['audio_s'] / 3600:.2f} h, model {args.model} "
              f"({'float16' if fp16 else 'float32'}), {device_name()}", flush=True)
    languages = {f["path"]: f["language"] for f in files}
    audio_s = results["audio_s"]
    for method in methods:
        drop_models()
        words = method.split(":")[0].endswith("words")
        extra = {}
        if method.startswith("seq"):
            run_sequential(warm, {"warm": "en"}, folder, fp16, words, loaded.is_multilingual)
            mx.reset_peak_memory()
            out, wall = run_sequential(audios, languages, folder, fp16, words, loaded.is_multilingual)
        else:
            batch_size, from_paths = engine_variant(method, args.batch_size)
            run_engine(warm, args.model, words, batch_size, args.min_region_s)
            inputs = {p: args.archive / p for p in audios} if from_paths else audios
            runs = []
            for _ in range(args.repeat):
                mx.reset_peak_memory()
                out, wall, extra = run_engine(inputs, args.model, words, batch_size, args.min_region_s)
                runs.append((wall, out, {**extra, "peak_gib": round(mx.get_peak_memory() / 2**30, 2)}))
            # The fastest run is reported: on a fresh machine the first compiles kernels, and on an
            # H200 (24.6 h, 64 rows) the archive's second run in one process took 65.9 s where the
            # first took 54.4 s (and a second run with its rows planned chose 18: README "Batch size").
            wall, out, extra = min(runs, key=lambda run: run[0])
            if len(runs) > 1:
                extra["walls_s"] = [round(run[0], 2) for run in runs]
        outputs[method] = out
        row = {"x_real_time": round(audio_s / wall, 1), "wall_s": round(wall, 2),
               "peak_gib": round(mx.get_peak_memory() / 2**30, 2), **extra}  # an engine method: its reported run's peak
        results["methods"][method] = row
        print(method, json.dumps(row), flush=True)

    everything = {f["path"] for f in manifest["files"]}
    for method, out in outputs.items():  # WER once a method has every file (merged shards too)
        if everything <= set(out):
            results["methods"][method]["wer"] = wer_table(manifest, {p: o["text"] for p, o in out.items()})
            print(method, "WER", json.dumps(results["methods"][method]["wer"]), flush=True)
    for eng in [m for m in outputs if m.startswith("engine")]:
        words = eng.split(":")[0].endswith("words")
        seq = "seq-words" if words else "seq"
        if seq in outputs and set(outputs[eng]) <= set(outputs[seq]):
            cmp = {"exactness": exactness(manifest, outputs[eng], {p: outputs[seq][p] for p in outputs[eng]}),
                   "speedup": round(results["methods"][eng]["x_real_time"] / results["methods"][seq]["x_real_time"], 2)}
            if words:
                cmp["word_starts_vs_sequential"] = word_starts(outputs[seq], outputs[eng], list(outputs[eng]))
            results[f"{eng}_vs_{seq}"] = cmp
            print(f"{eng} vs {seq}", json.dumps(cmp), flush=True)

    if args.lone:
        results["lone"] = lone_runs(args, manifest, audios, outputs, [float(x) for x in args.lone.split(",")])

    if args.json_out:
        results["texts"] = {m: {p: o["text"] for p, o in out.items()} for m, out in outputs.items()}
        results["outputs"] = outputs  # every method's texts, words and (sequential) times, for --reuse
        args.json_out.write_text(json.dumps(results, indent=1, ensure_ascii=False))


def load_archive(args, files: list[dict], loaded):
    """(audio by path, a weights folder for mlx_whisper, a warm-up input, float16?)."""
    # Decoding 24 h of containers is minutes on one core, and threads do not help (PyAV and soxr
    # hold the GIL frame by frame: 2 threads took 7.7 s for 20 files that took 3.2 s alone), so
    # processes; spawned, as this one has MLX loaded.
    paths = [f["path"] for f in files]
    with ProcessPoolExecutor(os.cpu_count() or 2, mp_context=multiprocessing.get_context("spawn")) as pool:
        audios = dict(zip(paths, pool.map(load_audio, [args.archive / p for p in paths], chunksize=4)))
    fp16 = mx.default_device() == mx.gpu
    folder = write_weights_folder(loaded.path, Path(tempfile.mkdtemp()), mx.float16 if fp16 else mx.float32)
    warm = {"warm": next(iter(audios.values()))[: 40 * SAMPLE_RATE]}  # loads the model, compiles kernels
    return audios, folder, warm, fp16


def merge_outputs(results: dict, outputs: dict, earlier: dict, name: str) -> None:
    """Add an earlier run's (or shard's) outputs; a sequential method's row is recomputed over
    every file merged so far (its x real time from the files' own times)."""
    found = earlier.get("outputs") or earlier.get("sequential_outputs")
    if not found:  # the reports kept in the repository hold texts only
        raise SystemExit(f"{name}: no outputs (a report trimmed to texts); pass a full --json-out")
    for method, out in found.items():
        merged = outputs.setdefault(method, {})
        merged.update(out)
        row = results["methods"].setdefault(method, dict(earlier["methods"].get(method, {})))
        if method.startswith("seq") and all("wall_s" in o for o in merged.values()):
            wall = sum(o["wall_s"] for o in merged.values())
            row.update(x_real_time=round(results["audio_s"] / wall, 1), wall_s=round(wall, 2), files=len(merged))
        row.pop("wer", None)


def lone_set(session, audios: dict, paths: list[str], options, repeat: int) -> tuple[dict, float, int, int]:
    """Each file of a set alone in the session, one after another: (outputs, wall, splits, rounds).
    A file's wall is the median of ``repeat`` runs; its splits and rounds are the last run's
    (every run cuts alike)."""
    out, wall, splits, rounds = {}, 0.0, 0, 0
    for path in paths:
        walls = []
        for _ in range(repeat):
            before = (session.stats.splits, session.stats.rounds)
            t0 = time.perf_counter()
            t = session.submit(audios[path], options=options, key=path)
            session.run_until_done([t])
            walls.append(time.perf_counter() - t0)
            out[path] = transcript_output(t.result())
        splits += session.stats.splits - before[0]
        rounds += session.stats.rounds - before[1]
        wall += statistics.median(walls)
    return out, wall, splits, rounds


def lone_runs(args, manifest: dict, audios: dict, outputs: dict, lengths: list[float]) -> list[dict]:
    """Each file of the lone sets alone in a session: the engine cuts it to fill idle rows, never
    below min_region_s. A long file whole is timed (median of --lone-repeat runs) against
    sequential on it; a set of pieces (each alone) gives WER over many cut placements, as a
    measure of what cutting costs that one file cannot give."""
    names = args.lone_sets.split(",") if args.lone_sets else ["mix-whole", "read2-whole", "lj-whole"]
    names = [k for k in names if k in manifest["sets"]]
    rows = []
    for words in [m == "on" for m in args.lone_words.split(",")]:
        seq = outputs.get("seq-words" if words else "seq")
        options = EngineOptions(word_timestamps=words)
        for min_region_s in lengths:
            session = new_session(args.model, args.batch_size, min_region_s)
            try:
                for name in names:
                    paths = manifest["sets"][name]["files"]
                    repeat = args.lone_repeat if len(paths) == 1 else 1
                    out, wall, splits, rounds = lone_set(session, audios, paths, options, repeat)
                    seconds = sum(len(audios[p]) for p in paths) / SAMPLE_RATE
                    row = {"set": name, "files": len(paths), "words": words, "min_region_s": min_region_s,
                           "x_real_time": round(seconds / wall, 1), "wall_s": round(wall, 3), "splits": splits,
                           "rounds": rounds, "wer": round(100 * set_wer(manifest, {p: o["text"] for p, o in out.items()}, [name])[0], 2)}
                    if seq is not None and all(p in seq for p in paths):
                        seq_wall = sum(seq[p]["wall_s"] for p in paths)
                        row["sequential_wer"] = round(100 * set_wer(manifest, {p: seq[p]["text"] for p in paths}, [name])[0], 2)
                        row["sequential_x_real_time"] = round(seconds / seq_wall, 1)
                        row["speedup"] = round(seq_wall / wall, 2)
                        row["exactness"] = exactness(manifest, out, {p: seq[p] for p in paths})
                        if words:
                            row["word_starts_vs_sequential"] = word_starts(seq, out, paths)
                    row["texts"] = {p: o["text"] for p, o in out.items()}
                    rows.append(row)
                    print("lone", json.dumps({k: v for k, v in row.items() if k != "texts"}), flush=True)
            finally:
                session.close()
    return rows


if __name__ == "__main__":
    main()
