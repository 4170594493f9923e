"""How far sequential Whisper's own text moves when it starts somewhere else: the noise floor of
cutting a file.

    .venv/bin/python benchmarks/late_start.py --model base --files read2,mix --offsets 40,150,260 --json-out late.json

For each long file: sequential ``mlx_whisper.transcribe`` on the whole file, then on the audio from
each offset on (``--span`` seconds; no previous text, as a cut stretch starts). No cut is made
inside either run: the late one is what the whole-file run would have been had it begun there.
Reported per offset, over the late run's words from 1 s after its start to 30 s before its end
(so neither run's file end counts):
- the words that differ from the whole-file run's (difflib over normalised words), per 30 s after
  the start: whether the two decodings come back together as they go on;
- the segment starts the two runs share (a shared start is a shared seek point);
- the WER change of a splice: the whole-file text with that stretch replaced by the late run's,
  against the reference, joined where both runs end a segment (so no word is repeated or
  dropped): one start moved, and nothing else, changes WER by this much.

A script that prints numbers, not a test. Needs jiwer and whisper-normalizer
(benchmarks/install_bench_deps.sh).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from bench_archive import _normalise, errors  # noqa: E402
from bench_engine import write_weights_folder  # noqa: E402
from engine.audio import SAMPLE_RATE, load_audio  # noqa: E402
from engine.model_store import resolve_model  # noqa: E402

LONG_FILES = {"mix": "english_read_mix_concat.flac", "read2": "english_read2_concat.flac"}
BIN_S = 30.0  # differing words are counted per this many seconds after the late start
EDGE_S = (1.0, 30.0)  # words this close to the late run's start and end are left out
SEAM_S = 0.6  # a splice joins the runs where each has a segment boundary within this of the other's

Segments = list[tuple[float, float, str]]  # (start_s, end_s, text), on the whole file's clock


def transcribe(audio, folder: Path, fp16: bool, shift_s: float = 0.0) -> Segments:
    import mlx_whisper

    r = mlx_whisper.transcribe(audio, path_or_hf_repo=str(folder), fp16=fp16, language="en")
    return [(s["start"] + shift_s, s["end"] + shift_s, s["text"]) for s in r["segments"]]


def timed_words(segments: Segments) -> list[tuple[str, float]]:
    """Each normalised word with a time: spread evenly over its segment (words are off)."""
    out = []
    for start_s, end_s, text in segments:
        words = _normalise(text, "en")
        out += [(w, start_s + (end_s - start_s) * (i + 0.5) / len(words)) for i, w in enumerate(words)]
    return out


def differing_per_bin(a: list[tuple[str, float]], b: list[tuple[str, float]], t0: float) -> dict[int, int]:
    """Words of ``b`` that differ from ``a`` (both timed words of one span), per BIN_S after t0."""
    bins: dict[int, int] = {}
    matcher = difflib.SequenceMatcher(a=[w for w, _ in a], b=[w for w, _ in b], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            at_s = (b[j1] if j1 < len(b) else a[min(i1, len(a) - 1)])[1]
            k = int((at_s - t0) // BIN_S)
            bins[k] = bins.get(k, 0) + max(i2 - i1, j2 - j1)
    return dict(sorted(bins.items()))


def seams(whole: Segments, late: Segments, lo_s: float, hi_s: float) -> list[tuple[float, float]]:
    """Places in [lo_s, hi_s) where both runs end a segment (within SEAM_S of each other): (whole's, late's).
    Whisper's segments follow one another without gaps, so only there can the text be joined
    without repeating or dropping a word."""
    ends = [e for _, e, _ in late]
    out = []
    for _, end_s, _ in whole:
        near = min(ends, key=lambda e: abs(e - end_s), default=None)
        if near is not None and abs(near - end_s) <= SEAM_S and lo_s <= end_s < hi_s:
            out.append((end_s, near))
    return out


def splice(whole: Segments, late: Segments, first: tuple[float, float], last: tuple[float, float]) -> str:
    """The whole-file text with the late run's segments between two seams in place of its own."""
    before = [t for _, e, t in whole if e <= first[0]]
    inside = [t for a, e, t in late if a >= first[1] and e <= last[1]]
    after = [t for a, _, t in whole if a >= last[0]]
    return " ".join(before + inside + after)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base")
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "audio"))
    p.add_argument("--files", default="read2,mix", help="of: " + ", ".join(LONG_FILES))
    p.add_argument("--offsets", default="40,100,150,200,260", help="seconds where the late runs start")
    p.add_argument("--span", type=float, default=200.0, help="seconds each late run decodes")
    p.add_argument("--json-out")
    args = p.parse_args()

    fp16 = mx.default_device() == mx.gpu
    folder = write_weights_folder(resolve_model(args.model), Path(tempfile.mkdtemp()), mx.float16 if fp16 else mx.float32)
    print(f"{args.model} ({'float16' if fp16 else 'float32'}), {mx.default_device()}", flush=True)
    report = {}
    for name in args.files.split(","):
        path = Path(args.shared) / "longform" / LONG_FILES[name]
        audio = load_audio(path)
        reference = path.with_suffix(".txt").read_text()
        t = time.perf_counter()
        whole = transcribe(audio, folder, fp16)
        e_whole, n = errors(reference, " ".join(s[2] for s in whole), "en")
        print(f"{name}: whole file {100 * e_whole / n:.2f} % WER, {time.perf_counter() - t:.1f} s", flush=True)
        starts = {round(s[0], 2) for s in whole}
        whole_words = timed_words(whole)
        rows = []
        for t0 in (float(x) for x in args.offsets.split(",")):
            late = transcribe(audio[int(t0 * SAMPLE_RATE):int((t0 + args.span) * SAMPLE_RATE)], folder, fp16, t0)
            lo_s, hi_s = t0 + EDGE_S[0], min(t0 + args.span, len(audio) / SAMPLE_RATE) - EDGE_S[1]
            joins = seams(whole, late, lo_s, hi_s)
            e_splice, _ = errors(reference, splice(whole, late, joins[0], joins[-1]), "en") if len(joins) > 1 else (e_whole, n)
            mine = [x for x in whole_words if lo_s <= x[1] < hi_s]
            words = len(mine)
            bins = differing_per_bin(mine, [x for x in timed_words(late) if lo_s <= x[1] < hi_s], t0)
            shared = [s[0] for s in late if round(s[0], 2) in starts]
            row = {"offset_s": t0, "span_s": [lo_s, hi_s], "words": words, "differing_per_30s": bins,
                   "differing_share": sum(bins.values()) / max(1, words),
                   "shared_segment_starts": len(shared), "late_segments": len(late),
                   "first_shared_start_s": shared[0] if shared else None,
                   "splice_s": [joins[0][0], joins[-1][0]] if len(joins) > 1 else None,
                   "splice_wer_points": 100 * (e_splice - e_whole) / n}
            rows.append(row)
            print(f"  from {t0:5.1f} s: {words} words, {100 * row['differing_share']:.1f} % differ "
                  f"(per 30 s: {bins}), {len(shared)}/{len(late)} segment starts shared "
                  f"(first at {row['first_shared_start_s']}), splice {row['splice_s']}: {row['splice_wer_points']:+.2f} WER points", flush=True)
        report[name] = {"whole_wer": e_whole / n, "reference_words": n, "late": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
