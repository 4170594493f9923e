"""The CUDA driver's memory pool under MLX, read through the driver API (ctypes).

MLX's CUDA allocator takes device memory with ``cudaMallocAsync`` from the device's default memory
pool and gives it back with ``cudaFreeAsync``. The pool may keep what it is given back, and under
MLX it did: neither ``mx.clear_cache()`` nor the end of a session returned memory to the card, so
CUDA's free memory no longer counted it, and MLX's active and cached bytes did not count it either.
Measured on an H200 (base, float16, 24.6 h archive, one process): after one engine session the
process held 137,202 MiB by nvidia-smi with MLX holding 0.29 GiB, CUDA reported 5.8 GiB free,
and the next session planned 18 rows instead of 64 (README "Batch size").

So the batch plan counts the pool's idle memory (reserved but not handed out) as this process's.
(Trimming the pool when a worker idles, cuMemPoolTrimTo, was tried in one GPU run: the one worker
that sat idle for 5 s there left no shutdown lines in its log, as if it had died at that moment;
not proven, but trimming was taken out. engine.memory's bound_allocator keeps what the pool can
grow to near the plan instead.) Without libcuda (macOS, a CPU box) or a pool, this reads nothing.
"""

from __future__ import annotations

import ctypes
import functools

# CUmemPool_attribute (cuda.h)
_RESERVED_MEM_CURRENT = 5  # bytes the pool holds from the device
_USED_MEM_CURRENT = 7  # of those, bytes handed out and not yet given back


@functools.cache
def _default_pool() -> tuple[ctypes.CDLL, ctypes.c_void_p] | None:
    """The driver library and device 0's default pool (MLX's device: CUDA_VISIBLE_DEVICES pins a card)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, pool = ctypes.c_int(), ctypes.c_void_p()
    try:
        if lib.cuInit(0) or lib.cuDeviceGet(ctypes.byref(device), 0):
            return None
        if lib.cuDeviceGetDefaultMemPool(ctypes.byref(pool), device):
            return None
    except AttributeError:  # a driver too old for memory pools (before CUDA 11.2)
        return None
    return lib, pool


def _attribute(which: int) -> int | None:
    found = _default_pool()
    if found is None:
        return None
    lib, pool = found
    value = ctypes.c_uint64()
    if lib.cuMemPoolGetAttribute(pool, which, ctypes.byref(value)):
        return None
    return value.value


def pool_bytes() -> tuple[int, int] | None:
    """(reserved, used) bytes of the default pool, or None where there is none to read."""
    reserved, used = _attribute(_RESERVED_MEM_CURRENT), _attribute(_USED_MEM_CURRENT)
    if reserved is None or used is None:
        return None
    return reserved, used


def idle_bytes() -> int:
    """Memory the pool holds for this process but has not handed out: MLX's to take again."""
    found = pool_bytes()
    return max(0, found[0] - found[1]) if found else 0

