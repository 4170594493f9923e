"""How far 8-bit rounding alone moves WER: one model quantised on several equally fine grids.

    .venv/bin/python benchmarks/build_archive.py --out /tmp/qarch --tilings 0 --english-only
    .venv/bin/python benchmarks/quant_spread.py --model tiny.en --seeds 1,2,3,4,5,6,7,8 --archive /tmp/qarch --json-out spread.json

`archive-asr models quantize` rounds each group of 64 weights to MLX's affine grid: 256 levels
over the group's range, anchored at its larger end. That grid is one of many equally fine ones.
Shift it by a random fraction of a step (256 levels spanning the group's range plus one step,
starting up to one step below its minimum) and every weight is still rounded to the nearest
level, with the same RMS error, in the same bits and group size: an 8-bit model as good by
construction, whose rounding falls elsewhere. The WER of these models against full precision,
per file and on the archive, tells what 8-bit rounding itself costs and how far it spreads: a
loss that every grid shows is the rounding's, one that a few show is luck.

Each variant is written as a full-precision folder holding the rounded weights (float32: the
values the 8-bit model computes with, scales and biases rounded to float16 as they are stored), so
it runs through the engine like any model. ``--seeds 0`` is MLX's own grid (the model
`models quantize --bits 8` writes): it must give that model's WER, which checks the method. The
variants go into a temporary models folder (the full-precision source is converted there too),
never the user's.

Word timestamps on, each long file whole (one file, one row: sequential Whisper's decoding), the
archive every file at once, as bench_quant.py runs them. Needs jiwer and whisper-normalizer
(benchmarks/install_bench_deps.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

GROUP_SIZE = 64


def rounded(weight: mx.array, seed: int, rng: np.random.Generator, bits: int = 8) -> np.ndarray:
    """``weight`` rounded to a ``bits``-bit affine grid per group of 64 and back, as float32.

    seed 0: MLX's own grid (mx.quantize's scales and biases). Otherwise a grid of the same
    resolution shifted by a random fraction of a step, one draw per group.
    """
    levels = 2**bits - 1  # steps between the lowest and the highest level
    if seed == 0:
        # in float32, from the float16 scales and biases, as the CPU's quantised layers compute
        packed, scales, biases = mx.quantize(weight, group_size=GROUP_SIZE, bits=bits)
        return np.array(mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32),
                                      group_size=GROUP_SIZE, bits=bits))
    w = np.array(weight.astype(mx.float32)).reshape(-1, GROUP_SIZE)
    low, high = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    # levels - 1 steps span the range, so a shift of up to one step keeps it inside the grid
    scale = np.maximum((high - low) / (levels - 1), np.float32(1e-8)).astype(np.float16).astype(np.float32)
    shift = rng.random((w.shape[0], 1), dtype=np.float32)
    bias = (low - shift * scale).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((w - bias) / scale), 0, levels)
    return (q * scale + bias).reshape(weight.shape).astype(np.float32)


def write_variant(source: str, seed: int, bits: int = 8) -> str:
    """Write ``source`` rounded on grid ``seed`` into the models folder; return its name."""
    from mlx.utils import tree_flatten

    from engine.convert import write_mlx_folder
    from engine.holder import load_mlx_folder
    from engine.model_store import models_dir, read_meta, resolve_model
    from engine.quantize import is_quantizable

    name = f"{source}-grid{bits}-s{seed}"
    dest = models_dir() / name
    if dest.exists():
        return name
    folder = resolve_model(source)
    model, dims, _ = load_mlx_folder(folder, mx.float16)  # round from the weights as stored
    rng = np.random.default_rng(seed)
    changed = 0
    for _, module in model.named_modules():  # the layers `models quantize` rounds
        if is_quantizable(module, GROUP_SIZE):
            module.weight = mx.array(rounded(module.weight, seed, rng, bits))
            changed += 1
    weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters()) if k != "alignment_heads"}
    meta = read_meta(folder) | {"name": name, "grid_seed": seed, "grid_bits": bits, "rounded_layers": changed}
    write_mlx_folder(dest, weights, dims, meta)
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8", help="comma-separated; 0 = MLX's own grid")
    ap.add_argument("--bits", type=int, default=8, help="grid resolution; 10 or 12 (not a format MLX stores) as a control of finer rounding")
    ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=True, help="run full precision first")
    ap.add_argument("--archive", type=Path, default=None, help="a folder made by build_archive.py (optional)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    if args.bits not in (2, 3, 4, 6, 8) and "0" in args.seeds.split(","):
        ap.error(f"--seeds 0 is MLX's own grid, which has no {args.bits}-bit form")
    models = tempfile.mkdtemp(prefix="quant-spread-")  # the variants (float32: 300 MB each for base) go with it
    os.environ["ARCHIVE_ASR_MODELS_DIR"] = models
    try:
        run(args)
    finally:
        shutil.rmtree(models, ignore_errors=True)


def run(args: argparse.Namespace) -> None:
    from bench_quant import LONG_NAMES, SHARED, _released, archive_run, long_file

    results: dict = {"model": args.model, "bits": args.bits, "group_size": GROUP_SIZE, "runs": []}
    names = ([args.model] if args.full else []) + [write_variant(args.model, int(s), args.bits) for s in args.seeds.split(",")]
    for name in names:
        row: dict = {"name": name, "long_files": {}}
        for rel in LONG_NAMES:
            row["long_files"][Path(rel).stem] = long_file(SHARED / rel, name, None)
        if args.archive:
            row["archive"] = archive_run(args.archive, name, 0)
        results["runs"].append(row)
        print(name, json.dumps({"long": {k: v["wer_percent"] for k, v in row["long_files"].items()},
                                "archive": row.get("archive", {}).get("wer", {}).get("overall-en")}), flush=True)
        if args.json_out:
            args.json_out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
        _released()


if __name__ == "__main__":
    main()
