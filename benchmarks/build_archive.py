"""Build a many-file archive from ../shared/audio, with references, for the archive-mode benchmarks.

An archive, as archive-asr meets one: the three long files whole; each English long file cut
several times over into pieces of about 1.5 to 5 minutes (a "tiling": pieces that cover the whole file
end to end, cut in the 0.5 s gaps between its clips, so no word is cut; each tiling cuts at other
places); every short clip of en/, formats/ and (for a multilingual model) multi/. Pieces are written
in mixed containers (FLAC, MP3, Opus, M4A, WAV) as separate files.

WER is measured per set: a tiling's pieces, transcribed separately, are joined in order and
scored against the long file's reference (benchmarks/bench_archive.py, bench_run.py).

    .venv/bin/python benchmarks/build_archive.py --out /tmp/archive --tilings 9
    # manifest: /tmp/archive/manifest.json

Output: OUT/<set>/<nn>.<ext> and OUT/manifest.json {"files": [{"path", "set", "order",
"seconds", "language"}], "sets": {name: {"reference", "language", "files"}}}.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.audio import SAMPLE_RATE, load_audio  # noqa: E402

CONTAINERS = ("flac", "mp3", "opus", "m4a", "wav")
PIECE_S = (90.0, 300.0)  # a piece's length is drawn from this range
MIN_LAST_S = 30.0  # a shorter last piece joins the one before it


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def units(shared: Path, name: str) -> list[tuple[float, float]]:
    """(start_s, end_s) of the clips a long file is made of, in order: the places it may be cut between."""
    lf = shared / "longform"
    if name == "mix":
        rows = _rows(lf / "english_read_mix_concat.segments.tsv")
        lj = [(float(r["start"]), float(r["end"])) for r in _rows(lf / "ljspeech_LJ001-0001_to_0032_concat.segments.tsv")]
        rest = [(float(r["start"]), float(r["end"])) for r in rows[1:]]  # rows[0] is the LJ file, whole
        return lj + rest
    return [(float(r["start_s"]), float(r["end_s"])) for r in _rows(lf / "english_read2_concat.segments.tsv")]


LONG = {
    "mix": "longform/english_read_mix_concat.flac",
    "read2": "longform/english_read2_concat.flac",
    "lj": "longform/ljspeech_LJ001-0001_to_0032_concat.wav",
}


def tiling(spans: list[tuple[float, float]], total_s: float, rng: random.Random) -> list[tuple[float, float]]:
    """Pieces covering [0, total_s], each cut in a gap between two clips.

    The cut falls anywhere in the gap's middle half, not at its centre: two tilings that cut at the
    same gaps would otherwise write byte-identical pieces, which `archive-asr enqueue` rightly
    counts once (122 of the 501 files of an 80-tiling archive), while the engine-only benchmark
    decodes every file; the two would not be measured on the same audio."""
    cuts = [0.0]
    target = rng.uniform(*PIECE_S)
    for (_, end), (nxt, _) in zip(spans, spans[1:]):
        if end - cuts[-1] >= target:
            cuts.append(end + (nxt - end) * rng.uniform(0.25, 0.75))
            target = rng.uniform(*PIECE_S)
    if total_s - cuts[-1] < MIN_LAST_S and len(cuts) > 1:
        cuts.pop()
    cuts.append(total_s)
    return list(zip(cuts[:-1], cuts[1:]))


def write_audio(path: Path, audio: np.ndarray) -> None:
    """16 kHz mono float32 to a file of the container its suffix names (PyAV for lossy ones)."""
    ext = path.suffix[1:]
    if ext in ("flac", "wav"):
        import soundfile as sf

        sf.write(str(path), audio, SAMPLE_RATE)
        return
    import av

    fmt, codec, rate = {"mp3": ("mp3", "libmp3lame", 16000), "opus": ("ogg", "libopus", 48000), "m4a": ("ipod", "aac", 16000)}[ext]
    if rate != SAMPLE_RATE:
        import soxr

        audio = soxr.resample(audio, SAMPLE_RATE, rate)
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(audio.astype(np.float32)[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


_long_audio: dict[str, np.ndarray] = {}


def _load_long(shared: Path) -> None:
    """A builder process's copy of the English long files."""
    for name in ("mix", "read2"):
        _long_audio[name] = load_audio(shared / LONG[name])


def _write_piece(piece: tuple[str, Path, float, float]) -> None:
    name, path, a, b = piece
    write_audio(path, _long_audio[name][int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)])


def build(shared: Path, out: Path, tilings: int, multilingual: bool, seed: int, jobs: int = 1) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    files: list[dict] = []
    sets: dict[str, dict] = {}

    def add(rel: str, set_name: str, order: int, seconds: float, language: str) -> None:
        files.append({"path": rel, "set": set_name, "order": order, "seconds": round(seconds, 3), "language": language})
        sets[set_name]["files"].append(rel)

    for name, rel in LONG.items():  # the long files whole
        reference = (shared / rel).with_suffix(".txt").read_text().strip()
        dest = out / "whole" / Path(rel).name
        dest.parent.mkdir(exist_ok=True)
        shutil.copyfile(shared / rel, dest)
        sets[f"{name}-whole"] = {"reference": reference, "language": "en", "files": []}
        add(f"whole/{dest.name}", f"{name}-whole", 0, len(load_audio(dest)) / SAMPLE_RATE, "en")

    rng = random.Random(seed)
    container = 0
    pieces: list[tuple[str, Path, float, float]] = []  # (long file, path, start_s, end_s): planned here, written in parallel
    for name in ("mix", "read2"):
        total_s = len(load_audio(shared / LONG[name])) / SAMPLE_RATE
        reference = (shared / LONG[name]).with_suffix(".txt").read_text().strip()
        spans = units(shared, name)
        for k in range(tilings):
            set_name = f"{name}-pieces-{k}"
            sets[set_name] = {"reference": reference, "language": "en", "files": [], "long_file": name}
            folder = out / set_name
            folder.mkdir(exist_ok=True)
            for order, (a, b) in enumerate(tiling(spans, total_s, rng)):
                ext = CONTAINERS[container % len(CONTAINERS)]
                container += 1
                pieces.append((name, folder / f"{order:02d}.{ext}", a, b))
                add(f"{set_name}/{order:02d}.{ext}", set_name, order, b - a, "en")
    # encoding MP3/Opus/AAC is most of the build: one process per core (a 30-hour fleet archive)
    with ProcessPoolExecutor(jobs, initializer=_load_long, initargs=(shared,)) as pool:
        list(pool.map(_write_piece, pieces, chunksize=4))

    clip_dirs = ["en", "formats"] + (["multi"] if multilingual else [])
    for folder in clip_dirs:
        for path in sorted((shared / folder).iterdir()):
            if path.suffix in (".txt", ".md", ".tsv"):
                continue
            ref = path.with_suffix(".txt")
            if not ref.exists():
                continue
            parts = path.stem.split("_")  # multi/: leopard_test_de, aishell_zh_..., coqui_ru, nst_sv_...
            language = "en" if folder != "multi" else (parts[2] if parts[1] == "test" else parts[1])
            set_name = f"clip-{folder}-{path.name}"
            sets[set_name] = {"reference": ref.read_text().strip(), "language": language, "files": []}
            dest = out / "clips" / folder / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            add(f"clips/{folder}/{path.name}", set_name, 0, len(load_audio(dest)) / SAMPLE_RATE, language)

    manifest = {"files": files, "sets": sets, "tilings": tilings, "seed": seed}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "audio")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tilings", type=int, default=9, help="cuts of each English long file (each covers it whole)")
    ap.add_argument("--english-only", action="store_true", help="leave out multi/ (for English-only models)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes writing pieces")
    args = ap.parse_args()
    m = build(args.shared, args.out, args.tilings, not args.english_only, args.seed, args.jobs)
    hours = sum(f["seconds"] for f in m["files"]) / 3600
    print(f"{len(m['files'])} files, {hours:.2f} h of audio, {len(m['sets'])} sets -> {args.out / 'manifest.json'}")


if __name__ == "__main__":
    main()
