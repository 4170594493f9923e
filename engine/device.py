"""Which accelerator this process computes on: "auto", "cpu", "gpu" or "gpu:N".

A worker holds one device. On a CUDA machine with several GPUs each worker is pinned to one card
by CUDA_VISIBLE_DEVICES, set in its own environment before MLX is imported: CUDA then shows the
process that card alone, as device 0, so ``mx.device_info()`` (and engine.memory's batch plan) is
that card's memory, and no other card gets a context from it. A Mac has one GPU (gpu:0); "cpu"
makes MLX's CPU the default device.

    choice = parse_device("gpu:1")
    pin(choice)      # before mlx.core is imported anywhere in the process
    apply(choice)    # after: checks that the device exists, sets the default device
    device_name()    # "gpu:1 (NVIDIA H100 80GB HBM3)"

This module imports no MLX at module level, so it can be imported (and ``pin`` called) first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from engine.errors import EngineError

CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"  # CUDA's own variable, read by the CUDA runtime at its start
# The machine's count, left in the environment by the first count: a supervisor's workers inherit it
# and do not count again (each count imports MLX and starts CUDA in a subprocess: seconds before
# a worker's first job).
COUNT_ENV = "ARCHIVE_ASR_GPU_COUNT"
COUNT_TIMEOUT_S = 60.0  # importing MLX and starting the CUDA driver in the counting subprocess


class DeviceError(EngineError):
    """Raised when the device asked for is not on this machine, or was asked for too late."""


@dataclass(frozen=True)
class DeviceChoice:
    kind: str  # "auto", "cpu" or "gpu"
    index: int | None = None  # N of "gpu:N"; None: whichever GPU MLX uses by default

    def __str__(self) -> str:
        return f"gpu:{self.index}" if self.index is not None else self.kind


# What this process was pinned to (the index as the user named it, before CUDA renumbered it).
_pinned: DeviceChoice | None = None


def parse_device(text: str) -> DeviceChoice:
    """"auto", "cpu", "gpu", "gpu:N" (any case, spaces ignored) -> DeviceChoice; raises DeviceError."""
    value = text.strip().lower()
    if value in ("auto", "cpu", "gpu"):
        return DeviceChoice(value)
    if value.startswith("gpu:") and value[4:].isdigit():
        return DeviceChoice("gpu", int(value[4:]))
    raise DeviceError(f"device {text!r}: use auto, cpu, gpu or gpu:N (N = 0, 1, ...)")


def pin(choice: DeviceChoice) -> None:
    """Show CUDA only the chosen card (before MLX loads; no-op for auto, cpu and Metal)."""
    global _pinned
    if choice.index is not None and sys.platform != "darwin":
        if "mlx.core" in sys.modules:
            raise DeviceError(f"{choice}: MLX was imported before the device was chosen; pin it first")
        # Checked before CUDA is told: a CUDA_VISIBLE_DEVICES naming no card leaves MLX no GPU at all.
        n = count_gpus()
        if choice.index >= n:
            raise DeviceError(f"{choice}: {_no_gpu_reason(choice, n)}")
        # A scheduler (Slurm, a container runtime) may already have narrowed the cards: gpu:N is
        # then the N-th of those it allowed, as CUDA itself would number them.
        allowed = os.environ.get(CUDA_VISIBLE)
        cards = [c.strip() for c in allowed.split(",") if c.strip()] if allowed else None
        if cards is not None and choice.index >= len(cards):
            raise DeviceError(f"{choice}: {CUDA_VISIBLE}={allowed} allows only {len(cards)} GPU(s) here")
        os.environ[CUDA_VISIBLE] = cards[choice.index] if cards is not None else str(choice.index)
    _pinned = choice


def apply(choice: DeviceChoice) -> None:
    """Make the chosen device MLX's default; raise DeviceError if this machine has no such device."""
    import mlx.core as mx

    if choice.kind == "cpu":
        mx.set_default_device(mx.cpu)
        return
    if choice.kind == "auto":
        return
    if not _has_gpu(mx):
        raise DeviceError(f"{choice}: {_no_gpu_reason(choice)}")
    if sys.platform == "darwin" and choice.index not in (None, 0):
        raise DeviceError(f"{choice}: a Mac has one GPU, gpu:0")
    mx.set_default_device(mx.gpu)


def _has_gpu(mx) -> bool:
    try:
        return bool(mx.is_available(mx.gpu))
    except Exception:  # a CUDA runtime that finds no device (a pinned card that does not exist) may raise
        return False


def _no_gpu_reason(choice: DeviceChoice, n: int | None = None) -> str:
    if choice.index is None or sys.platform == "darwin":
        return "MLX sees no GPU on this machine (a CPU-only MLX, or no driver); use --device cpu or auto"
    n = count_gpus() if n is None else n  # counted without the pin, in a subprocess
    if n == 0:
        return "MLX sees no GPU on this machine (a CPU-only MLX, or no NVIDIA driver); use --device cpu or auto"
    return f"this machine has {n} GPU(s): gpu:0 to gpu:{n - 1}"


def gpus_here() -> int:
    """GPUs MLX can use in this process (imports MLX; 0 without a GPU backend)."""
    import mlx.core as mx

    if not _has_gpu(mx):
        return 0
    count = getattr(mx, "device_count", None)  # MLX >= 0.29; older ones (Metal) have one GPU
    return int(count(mx.gpu)) if count is not None else 1


def count_gpus() -> int:
    """GPUs this machine offers MLX, counted in a short subprocess.

    Not here: counting in this process would import MLX and start a CUDA context on GPU 0 that
    lives as long as the process. A supervisor that counts and then spawns one worker per card
    would hold that context's memory on GPU 0 all along (gpu:0's worker plans its batch from the
    card's free memory), and this process could no longer be pinned. The subprocess sees the
    cards as MLX sees them (a CPU-only MLX counts 0) and exits, freeing what it touched.
    The count is kept in ARCHIVE_ASR_GPU_COUNT for this process and the workers it starts.
    """
    known = os.environ.get(COUNT_ENV, "")
    if known.isdigit():
        return int(known)
    env = {k: v for k, v in os.environ.items()}
    if _pinned is not None and _pinned.index is not None:
        env.pop(CUDA_VISIBLE, None)  # count the machine's cards, not the one this process was given
    try:
        done = subprocess.run(
            [sys.executable, "-m", "engine.device"], env=env, capture_output=True, text=True, timeout=COUNT_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        raise DeviceError(f"counting GPUs took over {COUNT_TIMEOUT_S:.0f} s (a hung driver?)") from e
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DeviceError(f"could not count GPUs: {tail}")
    n = int(done.stdout.strip())
    os.environ[COUNT_ENV] = str(n)
    return n


def device_label() -> str:
    """What this process computes on, short: "cpu", "gpu" or "gpu:N" (N as pinned, not as CUDA renumbered it)."""
    import mlx.core as mx

    if mx.default_device() != mx.gpu:
        return "cpu"
    # Unpinned, MLX computes on the first GPU it sees.
    return f"gpu:{_pinned.index}" if _pinned is not None and _pinned.index is not None else "gpu:0"


def device_tag() -> str:
    """device_label() for a Celery node name: "cpu", "gpu1"."""
    return device_label().replace(":", "")


def device_name() -> str:
    """'cpu', or 'gpu:N (<device name>)' as MLX reports the card."""
    import mlx.core as mx

    label = device_label()
    if label == "cpu":
        return label
    try:
        info = mx.device_info()
    except Exception:  # older MLX: metal.device_info only
        info = {}
    name = info.get("device_name") or info.get("architecture") or ""
    return f"{label} ({name})" if name else label


if __name__ == "__main__":  # count_gpus() runs this (`-m` imported the engine package, OpenBLAS, first)
    print(gpus_here())
