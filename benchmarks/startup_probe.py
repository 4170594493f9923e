"""Where a worker's start goes, step by step, in one fresh process: the same steps, in the same
order, as `archive-asr worker --device gpu:0` takes before its first round.

    .venv/bin/python benchmarks/startup_probe.py --model base --audio ../shared/audio/en/<clip>.flac

Steps timed (seconds, each from the end of the one before): the package imports; counting the
GPUs (a subprocess, as the supervisor does); importing MLX; making the device the default (the
CUDA context starts here or at the first array); Celery's app and the tasks module; the batch plan
(worker.commands' "rows planned"); the model's weights; the session (its preparing threads and
decoders); the first file through the session (MLX compiles its kernels on first use: on CUDA
with NVRTC, cached on disk in MLX_PTX_CACHE_DIR, by default /tmp/mlx/<version>/ptx); the same file
again. Run it twice on a fresh machine to see the kernel cache's share (the first run fills it).

A script that prints numbers, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BEGAN = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--device", default="auto", help="auto, cpu, gpu:N")
    ap.add_argument("--audio", type=Path, required=True, help="a clip to run through the session twice")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    steps: dict[str, float] = {}
    last = [BEGAN]

    def mark(name: str) -> None:
        now = time.perf_counter()
        steps[name] = round(now - last[0], 3)
        last[0] = now

    import engine  # noqa: F401  (OpenBLAS before mlx.core)
    from engine.device import apply, count_gpus, parse_device, pin

    mark("import engine")
    choice = parse_device(args.device)
    gpus = count_gpus()
    mark("count GPUs (subprocess)")
    pin(choice)
    import mlx.core as mx

    mark("import mlx.core")
    apply(choice)
    mx.eval(mx.zeros((1,)) + 1)
    mark("device default, first array")
    from worker import tasks  # noqa: F401  (Celery, the app, SQLAlchemy's models)

    mark("import worker.tasks (Celery)")
    from engine.holder import get_model, planned_rows

    rows = planned_rows(args.model)
    mark("import holder, plan rows")
    get_model(args.model)
    mark("load weights")
    from engine.options import EngineOptions
    from engine.session import Session

    session = Session(args.model, batch_size=rows)
    mark("session (threads, decoders)")
    for name in ("first file (kernels compiled)", "same file again"):
        future = session.submit(str(args.audio), options=EngineOptions(word_timestamps=True))
        session.run_until_done([future])
        future.result()
        mark(name)
    session.close()
    result = {"device": str(mx.default_device()), "gpus": gpus, "rows": rows, "model": args.model,
              "steps_s": steps, "total_s": round(time.perf_counter() - BEGAN, 3)}
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
