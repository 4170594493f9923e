"""Choose how many 30 s windows to encode and decode at once from the device's memory.

The budget is ARCHIVE_ASR_MEMORY_BUDGET when set, else a share of what the device can give this
process (Metal: the recommended working set; CUDA: free memory; CPU: available RAM) on top of what
MLX already holds (the weights). Quantised weights are counted at their packed size, so the memory
they free becomes rows. Each window costs its encoder activations while encoding, then its encoder
output and the decoder's caches (cross-attention keys/values for the whole audio context,
self-attention keys/values up to the text context) while decoding; the batch is as many windows as
fit. The estimate is meant to be an upper bound: on a real run ``mx.get_peak_memory()`` should stay inside ``budget_bytes``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx

from archive_asr.settings import ENV_PREFIX, get_settings, parse_bytes
from engine import cuda_pool

log = logging.getLogger(__name__)

N_FRAMES = 3000  # mel frames in one 30 s window (the encoder's input length)
GIB = 1 << 30

# Share of the memory the device offers that the engine plans to use: the rest is for the OS,
# other processes, MLX's allocator slack and Python.
GPU_BUDGET_FRACTION = 0.75
CPU_BUDGET_FRACTION = 0.5
# Most rows per backend, whatever the memory allows.
# CUDA: one greedy step costs about the same at 128 rows as at 64 (H200, base float16: 2.5 vs
#   2.8 ms, benchmarks/bench_batch.py), but a round lasts until its slowest row ends its window,
#   and a queue's tail leaves rows idle while the longest files finish. On an 8.9 h, 197-file
#   archive (H200, words on) 64 rows ran 1888.8x real time and 128 rows 1368.5x (128 rows ran
#   first and paid MLX's kernel compilation, ~4 s of it); on a 30.6 h, 606-file queue 128 rows
#   spent 64.5 s on the device where 64 rows spent 79.3 s. 64 is the default (archives of a few
#   hours, fleets that split a queue, less memory); one deep queue on one card gains ~20 % with
#   `--batch-size 128`. (README "Batch size".)
# Metal: not measured beyond 64 on a Mac; unified memory is shared with everything else there.
# CPU: matmuls are compute-bound well before 16.
MAX_BATCH = {"cuda": 64, "metal": 64, "cpu": 16}
# MLX's memory limit on CUDA, as a multiple of the plan's weights and rows (bound_allocator): the
# plan's per-window figure is an upper bound, but a fallback round and the cache's mixed sizes need
# room (base, 64 rows: planned 15.2 GB, MLX's peak 18.3 GB on an H200).
ALLOCATOR_HEADROOM = 2.0
MIN_ALLOCATOR_LIMIT = 2 * GIB
# Live copies of the encoder's largest activation (attention scores q@k and their softmax) at once;
# measured: ~1.5 on the CPU (tiny.en, batch 1-8).
ATTENTION_COPIES = 2
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class DeviceMemory:
    device: str  # "cpu", "metal", "cuda"
    total_bytes: int
    available_bytes: int  # what this process may still take
    source: str  # where the numbers came from, for the log


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int  # windows encoded and decoded together
    budget_bytes: int  # planned ceiling for MLX's peak memory (weights included)
    device: str
    reason: str  # one line, logged and stored with the transcript
    per_window_bytes: int = 0
    weights_bytes: int = 0
    budget_source: str = ""  # where budget_bytes came from, for messages ("ARCHIVE_ASR_MEMORY_BUDGET=6GiB")

    def as_dict(self) -> dict:
        return asdict(self)


def _proc_meminfo() -> dict[str, int]:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return values


def _cpu_memory() -> DeviceMemory:
    if sys.platform.startswith("linux") and os.path.exists("/proc/meminfo"):
        info = _proc_meminfo()
        return DeviceMemory("cpu", info["MemTotal"], info.get("MemAvailable", info["MemFree"]), "/proc/meminfo")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # macOS has no cheap "available" figure without psutil: plan on half of physical memory
    return DeviceMemory("cpu", total, total // 2, "sysconf (half of physical memory)")


def device_memory() -> DeviceMemory:
    """What the default MLX device has and can still give this process."""
    if mx.default_device() != mx.gpu:
        return _cpu_memory()
    info = mx.device_info()
    if "total_memory" in info:  # CUDA backend
        total = int(info["total_memory"])
        free = int(info.get("free_memory", total))
        # MLX's own buffers are ours to reuse: the active ones (weights) and the cached ones,
        # which CUDA counts as taken (missing them, one H100 planned 17 rows instead of 64), and
        # what MLX gave back to CUDA's memory pool, which keeps it (engine.cuda_pool says why)
        mine = mx.get_active_memory() + mx.get_cache_memory() + cuda_pool.idle_bytes()
        return DeviceMemory("cuda", total, min(total, free + mine),
                            "mx.device_info() free_memory + MLX active + cache + CUDA pool idle")
    # Metal: unified memory; macOS lets one process wire about the recommended working set
    total = int(info.get("memory_size", 0))
    recommended = int(info.get("max_recommended_working_set_size", total))
    return DeviceMemory("metal", total, min(recommended, total or recommended), "mx.device_info() working set")


def backend() -> str:
    """"cuda", "metal" or "cpu": what the default MLX device is."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    return "metal" if sys.platform == "darwin" else "cuda"


def memory_budget() -> tuple[int, str, str]:
    """(budget_bytes, where it came from, device): the setting if given, else a share of the device's memory."""
    on_gpu = mx.default_device() == mx.gpu
    setting = get_settings().memory_budget
    if setting:
        return parse_bytes(setting), f"{ENV_PREFIX}MEMORY_BUDGET={setting}", "gpu" if on_gpu else "cpu"
    mem = device_memory()
    fraction = GPU_BUDGET_FRACTION if on_gpu else CPU_BUDGET_FRACTION
    source = f"{mem.device}: {mem.available_bytes / GIB:.1f} GiB available ({mem.source}) x {fraction}"
    return int(mem.available_bytes * fraction), source, mem.device


def per_window_bytes(dims, dtype_bytes: int, *, n_text_tokens: int | None = None, word_timestamps: bool = True) -> int:
    """Upper bound on the memory one 30 s window adds to a batch (bytes)."""
    ctx, state = dims.n_audio_ctx, dims.n_audio_state
    n_tokens = n_text_tokens or dims.n_text_ctx
    mel = N_FRAMES * dims.n_mels * (FLOAT32_BYTES + dtype_bytes)  # float32 mel and its cast
    conv = 2 * N_FRAMES * state * dtype_bytes  # conv1 output and its GELU, before the stride-2 conv2
    attention = ATTENTION_COPIES * dims.n_audio_head * ctx * ctx * dtype_bytes
    residual = 4 * ctx * state * dtype_bytes + 2 * ctx * 4 * state * dtype_bytes  # x, q, k, v; MLP hidden
    encoder_peak = mel + conv + attention + residual
    audio_features = ctx * state * dtype_bytes  # kept while decoding
    cross_kv = dims.n_text_layer * 2 * ctx * dims.n_text_state * dtype_bytes
    self_kv = dims.n_text_layer * 2 * n_tokens * dims.n_text_state * dtype_bytes
    # logits in float32 for the prompt pass and each step's log-softmax
    logits = 4 * dims.n_vocab * FLOAT32_BYTES
    decode = audio_features + cross_kv + self_kv + logits
    if word_timestamps:  # the alignment heads' cross-attention weights over all tokens, float32
        decode += dims.n_text_layer * dims.n_text_head * n_tokens * ctx * FLOAT32_BYTES
    # Encoding one batch overlaps with the previous batch's decoder state being freed: count both.
    return encoder_peak + decode


def plan_batch(
    dims,
    dtype: mx.Dtype,
    *,
    batch_size: int = 0,
    budget_bytes: int | None = None,
    max_batch: int | None = None,
    word_timestamps: bool = True,
    quantization: dict | None = None,
) -> BatchPlan:
    """How many windows to batch: ``batch_size`` > 0 overrides; else from ``budget_bytes``, the
    memory budget setting or the device. ``quantization`` is the model config's ({"bits", "group_size"})."""
    dtype_bytes = dtype.size
    window = per_window_bytes(dims, dtype_bytes, word_timestamps=word_timestamps)
    weights = weights_bytes(dims, dtype_bytes, quantization)
    on_gpu = mx.default_device() == mx.gpu
    device = "gpu" if on_gpu else "cpu"
    if batch_size > 0:
        budget = weights + batch_size * window
        return BatchPlan(batch_size, budget, device, f"batch size {batch_size} set by the user", window, weights,
                         "the batch size set by the user")
    cap = max_batch or MAX_BATCH[backend()]
    if budget_bytes is None:
        budget, source, device = memory_budget()
    else:
        budget = int(budget_bytes)
        source = "budget given"
    fits = max(0, (budget - weights) // window)
    size = max(1, min(cap, fits))
    reason = (
        f"{source} = {budget / GIB:.2f} GiB budget; weights {weights / GIB:.2f} GiB, "
        f"{window / GIB:.3f} GiB per window -> {fits} fit"
        + (f", capped at {cap}" if fits > cap else "")
        + (" (less than one: using 1)" if fits < 1 else "")
    )
    return BatchPlan(size, budget, device, reason, window, weights, source)


def weights_bytes(dims, dtype_bytes: int, quantization: dict | None = None) -> int:
    """Parameter memory of a Whisper model of these dimensions, loaded in a float of ``dtype_bytes``.

    Quantised (``{"bits", "group_size"}``, as in config.json): the Linear layers and the token
    embedding hold ``bits`` per weight plus a scale and a bias per group, both in the float dtype
    (engine.holder casts them); convolutions and the positional embedding stay float. The encoder's
    layers may have a group size of their own (config's per-layer entries, ``encoder.*``).
    """
    a, t = dims.n_audio_state, dims.n_text_state
    kept = dims.n_mels * a * 3 + a * a * 3 + dims.n_text_ctx * t  # convolutions, positional embedding
    encoder = dims.n_audio_layer * 12 * a * a
    decoder = dims.n_text_layer * 16 * t * t + dims.n_vocab * t
    if not quantization:
        return (kept + encoder + decoder) * dtype_bytes
    bits, group_size = int(quantization["bits"]), int(quantization["group_size"])
    own = [v for k, v in quantization.items() if k.startswith("encoder.") and isinstance(v, dict)]
    encoder_group = int(own[0]["group_size"]) if own else int(quantization.get("encoder_group_size", group_size))

    def packed(weights: int, group: int) -> int:
        return weights * bits // 8 + 2 * (weights // group) * dtype_bytes

    return kept * dtype_bytes + packed(encoder, encoder_group) + packed(decoder, group_size)


def log_plan(plan: BatchPlan) -> None:
    log.info("batch size %d (%s)", plan.batch_size, plan.reason)


@functools.cache
def _mlx_default_limit() -> int:
    """MLX's memory limit as it was before any session set one (a later session may need more)."""
    return mx.get_memory_limit()


def bound_allocator(plan: BatchPlan) -> int | None:
    """On CUDA, keep MLX's buffers (in use plus cached) near what the plan needs: ALLOCATOR_HEADROOM
    times the weights and the planned rows. MLX's default lets its cache grow to 90 % of the card;
    buffers of many sizes (rows of different lengths) fill it: one H200 process held 137 GB for a
    batch whose peak was 18 GB, which starves anything else on the card. On CUDA the limit only
    makes MLX free cached buffers sooner, never fails an allocation; Metal's can block or raise, so
    Metal keeps its default. Returns the limit set, or None."""
    if backend() != "cuda":
        return None
    need = plan.weights_bytes + plan.batch_size * plan.per_window_bytes
    limit = max(int(ALLOCATOR_HEADROOM * need), MIN_ALLOCATOR_LIMIT)
    limit = min(limit, _mlx_default_limit())  # never above MLX's own (90 % of the card)
    mx.set_memory_limit(limit)
    log.info("MLX memory limit %.1f GiB (%.1fx the plan's %.1f GiB)", limit / GIB, limit / max(need, 1), need / GIB)
    return limit
