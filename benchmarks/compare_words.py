"""Word timing of the batched engine vs sequential mlx-whisper's `word_timestamps=True`.

Both run in this process on the same decoded audio and the same loaded weights. Words are paired
by aligning the two lowercase alphanumeric word sequences (difflib.SequenceMatcher); the script
prints the share of sequential's words paired and the median / 95th percentile / max of
|start difference| and |end difference| (issue 4's targets: >= 90 %, <= 50 ms, <= 200 ms).

Sources of the batched side:
  engine  engine.transcribe.transcribe_audio (words on): the real thing
  mlx     sequential mlx-whisper WITHOUT words decodes; engine.words aligns its windows in one
          batch from their encoder output (isolates the word aligner from the decoder)

Usage: .venv/bin/python benchmarks/compare_words.py [FILE] [--model tiny.en] [--source engine]
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_FILE = REPO.parent / "shared" / "audio" / "longform" / "ljspeech_LJ001-0001_to_0032_concat.wav"

import engine  # noqa: E402,F401  (OpenBLAS before mlx.core)
import numpy as np  # noqa: E402

from tests.fixtures_engine_words import mlx_windows, sequential  # noqa: E402


def _key(word: str) -> str:
    return re.sub(r"[^0-9a-z]", "", word.lower())


def pair_words(reference: list[tuple[str, float, float]], candidate: list[tuple[str, float, float]]):
    """[(ref, cand)] for words equal after lowercasing and keeping only [0-9a-z]."""
    ref = [w for w in reference if _key(w[0])]
    cand = [w for w in candidate if _key(w[0])]
    matcher = difflib.SequenceMatcher(a=[_key(w[0]) for w in ref], b=[_key(w[0]) for w in cand], autojunk=False)
    pairs = []
    for block in matcher.get_matching_blocks():
        pairs += [(ref[block.a + k], cand[block.b + k]) for k in range(block.size)]
    return pairs, len(ref)


def report(reference, candidate) -> dict:
    pairs, n_ref = pair_words(reference, candidate)
    start = np.array([abs(r[1] - c[1]) for r, c in pairs]) * 1000
    end = np.array([abs(r[2] - c[2]) for r, c in pairs]) * 1000
    return {
        "sequential_words": n_ref,
        "batched_words": len([w for w in candidate if _key(w[0])]),
        "paired_pct": 100 * len(pairs) / max(n_ref, 1),
        "start_ms": (np.median(start), np.percentile(start, 95), start.max()) if len(pairs) else None,
        "end_ms": (np.median(end), np.percentile(end, 95), end.max()) if len(pairs) else None,
        "worst": sorted(pairs, key=lambda rc: -max(abs(rc[0][1] - rc[1][1]), abs(rc[0][2] - rc[1][2])))[:5],
    }


def batched_from_mlx_segments(audio: np.ndarray, loaded, result: dict):
    """engine.words on the windows of a sequential decode: one batch, encoder output reused."""
    from engine.words import add_word_timestamps, finalize_words

    features, windows = mlx_windows(audio, loaded, result)
    t0 = time.perf_counter()
    timed = add_word_timestamps(loaded, features, windows)
    align_s = time.perf_counter() - t0
    segments = finalize_words([s for w in timed for s in w])
    return [(w.word, w.start_s, w.end_s) for s in segments for w in s.words], align_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", nargs="?", default=str(DEFAULT_FILE), help="audio file")
    p.add_argument("--model", default="tiny.en", help="model name (engine.holder)")
    p.add_argument("--source", choices=("engine", "mlx"), default="engine", help="what produces the batched words")
    args = p.parse_args()

    from engine.audio import load_audio
    from engine.holder import device_name, get_model

    loaded = get_model(args.model)
    audio = load_audio(args.file)
    print(f"{Path(args.file).name}: {len(audio) / 16000:.1f} s, model {args.model} {loaded.dtype}, {device_name()}")

    t0 = time.perf_counter()
    seq = sequential(audio, loaded, word_timestamps=True)
    seq_s = time.perf_counter() - t0
    reference = [(w["word"], w["start"], w["end"]) for s in seq["segments"] for w in s.get("words", [])]
    print(f"sequential mlx-whisper, word_timestamps=True: {seq_s:.1f} s ({len(audio) / 16000 / seq_s:.1f}x real time)")

    if args.source == "engine":
        from engine.options import EngineOptions
        from engine.transcribe import transcribe_audio

        t0 = time.perf_counter()
        tr = transcribe_audio(audio, model_name=args.model, options=EngineOptions(word_timestamps=True))
        wall_s = time.perf_counter() - t0
        candidate = [(w.word, w.start_s, w.end_s) for s in tr.segments for w in s.words]
        print(f"batched engine, words on: {wall_s:.1f} s ({len(audio) / 16000 / wall_s:.1f}x real time)")
    else:
        plain = sequential(audio, loaded, word_timestamps=False)
        candidate, align_s = batched_from_mlx_segments(audio, loaded, plain)
        print(f"engine.words on sequential's no-words windows: alignment {align_s:.2f} s")

    r = report(reference, candidate)
    print(
        f"words: sequential {r['sequential_words']}, batched {r['batched_words']}, "
        f"paired {r['paired_pct']:.1f} % of sequential's (target >= 90 %)"
    )
    if r["start_ms"]:
        print("|start diff| ms: median {:.0f} (target <= 50), p95 {:.0f} (target <= 200), max {:.0f}".format(*r["start_ms"]))
        print("|end diff|   ms: median {:.0f}, p95 {:.0f}, max {:.0f}".format(*r["end_ms"]))
        print("largest differences (sequential | batched):")
        for ref, cand in r["worst"]:
            print(f"  {ref[0]!r:>16} {ref[1]:8.2f} {ref[2]:8.2f} | {cand[0]!r:>16} {cand[1]:8.2f} {cand[2]:8.2f}")


if __name__ == "__main__":
    main()
