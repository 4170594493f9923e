"""How fast one CPU thread runs while other CPUs of the host are busy (Linux).

A worker's driver thread dispatches MLX calls from Python, so its rounds run at the speed of one
CPU thread. Two workers on one host load twice as many CPUs (each worker's decoders, log-mel,
saves) and every CPU-side figure of the pair's workers came out 16-28 % slower per unit of work
than one worker's (README, "The fleet drill"). This probe tells the host's part in that apart
from the worker's:

  scaling:  a pure-Python loop's speed on one thread while N other processes spin (N = 0, 4, ...);
            a drop that grows with N is the host (clock, shared cores under the hypervisor)
  siblings: the loop pinned to CPU 0 while one spinner is pinned to CPU k, for each k: a k that
            slows it much more than the others shares CPU 0's physical core
  --burn N --seconds S: N spinning processes for S seconds (a load to run beside something else);
            with --memory they stream memory instead (64 MiB copies), as audio decoding does

usage: python benchmarks/host_cpu_probe.py [--json-out FILE]
       python benchmarks/host_cpu_probe.py --burn 14 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SPIN = "import os, sys\nif len(sys.argv) > 1: os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass\n"
# a spinner that streams memory instead: copies 64 MiB back and forth (far more than a core's share of
# the last-level cache), as decoding, resampling and the log-mel stream audio through memory
STREAM = "import numpy as np\na = np.ones(1 << 24, np.float32); b = np.empty_like(a)\nwhile True: np.copyto(b, a); np.copyto(a, b)\n"
MEASURE_S = 1.0  # each loop-speed sample
SETTLE_S = 0.3  # spinners started, before measuring


def loop_rate(seconds: float = MEASURE_S) -> float:
    """Iterations per second of a small pure-Python loop (the kind of work a driver thread does)."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            n += 1
    return n / seconds


def spinners(cpus: list[int | None], code: str = SPIN) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", code] + ([str(c)] if c is not None else [])) for c in cpus]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def scaling(n_cpus: int) -> list[dict]:
    rows = []
    for n in sorted({0, 2, 4, 8, 12, 16, 20, 24, 28, n_cpus - 1}):
        if n >= n_cpus:
            continue
        procs = spinners([None] * n)
        try:
            time.sleep(SETTLE_S)
            rate = max(loop_rate() for _ in range(2))
        finally:
            stop(procs)
        rows.append({"busy": n, "loops_per_s": round(rate)})
        print(f"  {n:2d} other CPUs busy: {rate / 1e6:.2f} M loops/s ({rate / rows[0]['loops_per_s']:.3f} of idle)", flush=True)
    return rows


def siblings(n_cpus: int) -> list[dict]:
    os.sched_setaffinity(0, {0})
    alone = max(loop_rate(0.5) for _ in range(2))
    rows = []
    for k in range(1, n_cpus):
        procs = spinners([k])
        try:
            time.sleep(0.1)
            rate = loop_rate(0.5)
        finally:
            stop(procs)
        rows.append({"cpu": k, "of_alone": round(rate / alone, 3)})
    os.sched_setaffinity(0, range(n_cpus))
    worst = sorted(rows, key=lambda r: r["of_alone"])[:4]
    print(f"  CPU 0 alone {alone / 1e6:.2f} M loops/s; slowest beside one spinner on CPU k: "
          + ", ".join(f"k={r['cpu']}: {r['of_alone']:.3f}" for r in worst), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burn", type=int, default=0, help="only spin this many processes (with --seconds)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--memory", action="store_true", help="--burn: processes that stream memory, not spin in cache")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    if args.burn:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # killed by the caller: stop the spinners too
        procs = spinners([None] * args.burn, STREAM if args.memory else SPIN)
        try:
            time.sleep(args.seconds)
        finally:
            stop(procs)
        return
    n_cpus = os.cpu_count() or 1
    print(f"{n_cpus} CPUs; a pure-Python loop on one thread while N others spin:", flush=True)
    result = {"cpus": n_cpus, "scaling": scaling(n_cpus)}
    print("the loop pinned to CPU 0, one spinner pinned to CPU k:", flush=True)
    result["siblings"] = siblings(n_cpus)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
