"""Make MLX's CPU backend use OpenBLAS on Linux.

The ``mlx[cpu]`` wheel bundles a reference BLAS: float32 matmul runs ~4.5 GFLOPS on this kind of
machine, against ~80-170 GFLOPS with OpenBLAS. Loading OpenBLAS with RTLD_GLOBAL before
``mlx.core`` is imported makes its ``cblas_*`` symbols win, the same as LD_PRELOAD would, so every
process that imports ``engine`` first (workers, tests, benchmarks, the CLI) gets the fast one.
"""

from __future__ import annotations

import ctypes
import os
import sys

# Debian/Ubuntu (libopenblas0-pthread), Fedora, Alpine, then whatever the loader finds.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "libopenblas.so.0",
)

_state: dict[str, str | None] = {"path": None, "reason": None}


def ensure_fast_blas() -> str | None:
    """Load OpenBLAS globally if this is Linux; return its path, or None (and remember why)."""
    if _state["path"] or _state["reason"]:
        return _state["path"]
    if not sys.platform.startswith("linux"):
        _state["reason"] = "not Linux: MLX uses Accelerate/Metal"
        return None
    if "mlx.core" in sys.modules:
        _state["reason"] = "mlx.core was imported before engine; OpenBLAS could not be put first"
        return None
    for path in CANDIDATES:
        if path.startswith("/") and not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _state["path"] = path
        return path
    _state["reason"] = "OpenBLAS not found (apt-get install libopenblas0-pthread)"
    return None


def blas_warning() -> str | None:
    """A one-line warning when MLX runs on the slow reference BLAS, else None."""
    if not sys.platform.startswith("linux") or _state["path"]:
        return None
    return f"MLX is using its slow reference BLAS on this CPU ({_state['reason']}); expect ~20x slower transcription"


def single_threaded_numpy_blas() -> int:
    """Give the OpenBLAS that numpy's (and scipy's) wheels bundle one thread; return how many such
    libraries were found (0 where numpy uses Accelerate or another BLAS).

    The engine's only numpy matrix product is the log-mel's small (frames x 201) @ (201 x mels),
    run by several preparing threads at once (engine.session). Split across every core, each call
    queues behind the others' and its threads spin between calls, taking cores from the thread
    that drives the device. 100 blocks of 30 s in 4 threads, on a shared 2-core box, five runs
    each: 2.0-5.3 s of wall time with the default threads, 1.2-2.6 s with one, and a quarter to
    half less CPU time. The OpenBLAS loaded above for MLX's CPU backend is another library and
    keeps its threads.
    """
    import numpy  # noqa: F401  (its BLAS must be loaded to be found)
    from threadpoolctl import ThreadpoolController

    bundled = ThreadpoolController().select(prefix="libscipy_openblas")
    bundled.limit(limits=1)
    return len(bundled.lib_controllers)
