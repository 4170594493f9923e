"""One file's log-mel, computed once, block by block, as sequential Whisper's input.

mlx_whisper.transcribe computes the log-mel of the whole signal with 30 s of zeros appended and
clamps it at 8 (log10 units) below the whole file's maximum. A window is then the file's frames
from the seek point, zero-padded to 3000 (``pad_or_trim``). Here the same frames are computed
from a stream of audio chunks, 30 s at a time (so memory does not grow with the file's length),
and stored *unclamped*; the file's maximum is tracked as the blocks go by, and the clamp and
normalisation are applied when a window is read. So every window equals sequential Whisper's,
however quiet its neighbourhood, and a 6-hour file never needs its whole signal in memory.

numpy and scipy do the arithmetic (not MLX): this runs in background threads while the device
decodes, and scipy's FFT releases the GIL.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import scipy.fft
from mlx_whisper.audio import HOP_LENGTH, N_FFT, N_FRAMES

BLOCK_FRAMES = N_FRAMES  # 3000 frames = 30 s computed at a time
PAD = N_FFT // 2  # 200 samples of context each side of a frame's centre
DYNAMIC_RANGE = 8.0  # log10 units (80 dB) kept below the file's maximum, as Whisper does
FLOOR = -10.0  # log10 of the 1e-10 power floor: what digital silence gives
IN_MEMORY_FRAMES = 360_000  # up to 1 hour (115 MB at 80 mels) in RAM; longer goes to a temp file


@dataclass
class FileMel:
    """A file's unclamped log10 mel (n_stored, n_mels) and what a window needs to read it."""

    log10: np.ndarray  # (n_stored, n_mels) float32, in RAM or memory-mapped
    content_frames: int  # frames of real audio: len(audio) // 160, as mlx_whisper counts them
    max_log10: float  # maximum over every frame sequential Whisper's clamp sees
    energy: np.ndarray  # (content_frames,) mean log10 per frame: where the quiet points are
    flat: np.ndarray  # (content_frames,) bool: the frame is digital silence (at the floor in every band)
    store_path: str | None = None  # the temporary file behind a memory-mapped log10 (deleted by close)

    def _normalised(self, frames: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Whisper's clamp and scaling, (max(x, file max - 8) + 4) / 4, in float32 (into ``out``)."""
        out = np.maximum(frames, self.max_log10 - DYNAMIC_RANGE, out=out)
        out += 4.0
        out /= 4.0
        return out

    def window(self, seek: int, end_frame: int) -> tuple[np.ndarray, int]:
        """The window at ``seek`` as mlx_whisper decodes it: (N_FRAMES, n_mels) normalised log-mel
        of frames [seek, min(seek + 3000, end_frame)), zeros after them; and how many are real."""
        out = np.empty((N_FRAMES, self.log10.shape[1]), np.float32)
        return out, self.window_into(out, seek, end_frame)

    def window_into(self, out: np.ndarray, seek: int, end_frame: int) -> int:
        """``window``, written into ``out`` (N_FRAMES, n_mels) float32: a round's rows are one
        reused buffer, not 64 new arrays stacked into a 65th. Returns how many frames are real."""
        size = max(0, min(N_FRAMES, end_frame - seek, self.content_frames - seek))
        self._normalised(self.log10[seek : seek + size], out=out[:size])
        out[size:] = 0.0
        return size

    def detection_window(self) -> np.ndarray:
        """The first 3000 frames of the padded mel, as mlx_whisper detects the language on them
        (``pad_or_trim(mel, N_FRAMES)``: past a short file's end these are frames of its zero
        padding, clamped to the floor, not zeros)."""
        return self._normalised(self.log10[:N_FRAMES])

    def close(self) -> None:
        if self.store_path is not None:
            self.log10 = np.zeros((0, self.log10.shape[1]), np.float32)
            with contextlib.suppress(OSError):
                os.unlink(self.store_path)
            self.store_path = None


@functools.lru_cache(maxsize=None)
def _filters(n_mels: int) -> np.ndarray:
    """mlx_whisper's mel filterbank (n_mels, 201), read with numpy: no MLX in preparing threads
    (MLX streams belong to the thread that made them)."""
    import mlx_whisper

    with np.load(Path(mlx_whisper.__file__).parent / "assets" / "mel_filters.npz") as f:
        return f[f"mel_{n_mels}"].astype(np.float32)


_WINDOW = np.hanning(N_FFT + 1)[:-1].astype(np.float32)
# Frames windowed and transformed at a time. A 30 s block at once made two 4.8 MB temporaries (the
# windowed frames, the complex spectrum) that stream through memory, which a GPU host shares with
# the engine's driver (README, "What a second worker costs the first"); 500 frames keep them at
# 0.8 MB. Same values to the bit; on the development CPU the log-mel of a mixed archive went from
# 3,254-3,558x to 3,472-3,773x real time per CPU second (benchmarks/bench_decode.py).
FFT_FRAMES = 500


def _block_log10(samples: np.ndarray, n_frames: int, filters: np.ndarray) -> np.ndarray:
    """(n_frames, n_mels) unclamped log10 mel from samples[0 : 160 n + 240] (context included)."""
    frames = np.lib.stride_tricks.as_strided(
        samples, shape=(n_frames, N_FFT), strides=(HOP_LENGTH * samples.strides[0], samples.strides[0])
    )
    power = np.empty((n_frames, N_FFT // 2 + 1), np.float32)  # (n, 201)
    for start in range(0, n_frames, FFT_FRAMES):
        part = slice(start, start + FFT_FRAMES)
        spectrum = scipy.fft.rfft(frames[part] * _WINDOW, axis=-1)  # (FFT_FRAMES, 201) complex64
        np.add(spectrum.real**2, spectrum.imag**2, out=power[part])
    mel = power @ filters.T  # (n, n_mels) float32
    return np.log10(np.maximum(mel, 1e-10, out=mel), out=mel)


class _Samples:
    """Samples of a stream, consumed from the front."""

    def __init__(self) -> None:
        self._chunks: deque[np.ndarray] = deque()
        self.size = 0

    def push(self, x: np.ndarray) -> None:
        if len(x):
            self._chunks.append(x)
            self.size += len(x)

    def push_front(self, x: np.ndarray) -> None:
        self._chunks.appendleft(x)
        self.size += len(x)

    def peek(self, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        filled = 0
        for c in self._chunks:
            take = min(n - filled, len(c))
            out[filled : filled + take] = c[:take]
            filled += take
            if filled == n:
                break
        return out

    def drop(self, n: int) -> None:
        """Drop the first n samples (past the end: all of them; what follows is zeros anyway)."""
        n = min(n, self.size)
        self.size -= n
        while n:
            c = self._chunks[0]
            if len(c) <= n:
                n -= len(c)
                self._chunks.popleft()
            else:
                self._chunks[0] = c[n:]
                n = 0


def file_mel(chunks: Iterable[np.ndarray], n_mels: int = 80) -> FileMel:
    """The FileMel of a 16 kHz float32 signal given as consecutive chunks of any length.

    Frames are mlx_whisper's: frame t covers samples [160 t - 200, 160 t + 200), reflected at the
    start, zeros past the end (its 30 s of padding). At least the first 3000 frames are stored
    (a short file's detection window), plus two past the end: those frames still hold the tail's
    samples and so count towards the maximum, as in mlx_whisper.
    """
    filters = _filters(n_mels)
    queue = _Samples()  # front = sample 160 * emitted - 200 of the reflect-padded signal
    blocks: list[np.ndarray] = []
    energy: list[np.ndarray] = []  # per block: mean log10 per frame
    spread: list[np.ndarray] = []  # per block: max - min over the bands, per frame
    peak: list[np.ndarray] = []  # per block: max over the bands, per frame
    store = None
    n_samples = emitted = 0
    started = False
    block_samples = BLOCK_FRAMES * HOP_LENGTH + 2 * PAD - HOP_LENGTH

    def emit(n: int) -> None:
        nonlocal emitted, store
        need = n * HOP_LENGTH + 2 * PAD - HOP_LENGTH
        block = _block_log10(queue.peek(need), n, filters)
        top = block.max(axis=1)
        blocks.append(block)
        energy.append(block.mean(axis=1))
        spread.append(top - block.min(axis=1))
        peak.append(top)
        queue.drop(n * HOP_LENGTH)
        emitted += n
        if store is None and emitted > IN_MEMORY_FRAMES:
            store = tempfile.NamedTemporaryFile(prefix="archive-asr-mel-", delete=False)
        if store is not None:  # a long file: its frames go to disk as they come
            for b in blocks:
                store.write(b.tobytes())
            blocks.clear()

    for chunk in chunks:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        n_samples += len(chunk)
        queue.push(chunk)
        if not started:
            if queue.size <= PAD:
                continue
            queue.push_front(queue.peek(PAD + 1)[1:][::-1].copy())  # reflect the first 200 samples
            started = True
        while queue.size >= block_samples:
            emit(BLOCK_FRAMES)
    if not started:  # under 201 samples in all: reflect what there is, zeros after it
        head = queue.peek(PAD + 1)
        queue.push_front(head[1:][::-1].copy())
    content = n_samples // HOP_LENGTH
    total = max(content + 2, N_FRAMES)
    while emitted < total:
        emit(min(BLOCK_FRAMES, total - emitted))  # peek pads with zeros past the signal

    if store is not None:
        store.close()
        log10 = np.memmap(store.name, dtype=np.float32, mode="r", shape=(emitted, n_mels))
    else:
        log10 = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    top = np.concatenate(peak)
    flat = (np.concatenate(spread) < 1e-3) & (top <= FLOOR + 1e-3)
    return FileMel(
        log10=log10,
        content_frames=content,
        max_log10=float(top[: content + 2].max()),
        energy=np.concatenate(energy)[:content],
        flat=flat[:content],
        store_path=store.name if store is not None else None,
    )
