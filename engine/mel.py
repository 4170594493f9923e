"""Log-mel spectrogram in blocks, so memory does not grow with the file's length.

mlx_whisper's `log_mel_spectrogram` takes the whole signal at once: a 6-hour file makes a
(2.16 M frames x 400) framed copy and a (2.16 M x 201) complex STFT, ~7 GB of intermediates, and
clamps at the maximum of the whole file. Here frames are computed block by block from a stream of
audio chunks, with the same framing (frame t covers samples [160 t - 200, 160 t + 200), reflected
at the start, zeros after the end as mlx_whisper.transcribe pads them), and the log-mel is
clamped at (block max - 8) per 30 s block, as Whisper saw each 30 s window in training.
Intermediates are O(block) whatever the length.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import mlx.core as mx
import numpy as np
from mlx_whisper.audio import HOP_LENGTH, N_FFT, N_FRAMES, hanning, mel_filters

BLOCK_FRAMES = N_FRAMES  # 3000 frames = 30 s: the unit of computation and of clamping
PAD = N_FFT // 2  # 200 samples of context each side of a frame's centre
DYNAMIC_RANGE = 8.0  # log10 units (80 dB) kept below the block's maximum, as Whisper does


class _SampleQueue:
    """Samples of a stream, consumed from the front without copying whole chunks."""

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
        """A copy of the first n samples (n <= size)."""
        out = np.empty(n, np.float32)
        filled = 0
        for c in self._chunks:
            take = min(n - filled, len(c))
            out[filled : filled + take] = c[:take]
            filled += take
            if filled == n:
                break
        return out

    def drop(self, n: int) -> None:
        self.size -= n
        while n:
            c = self._chunks[0]
            if len(c) <= n:
                n -= len(c)
                self._chunks.popleft()
            else:
                self._chunks[0] = c[n:]
                n = 0


def _block(samples: np.ndarray, n_frames: int, n_mels: int) -> mx.array:
    """(n_frames, n_mels) normalised log-mel from samples[0 : 160 n + 240] (context included)."""
    x = mx.array(samples)
    frames = mx.as_strided(x, shape=(n_frames, N_FFT), strides=(HOP_LENGTH, 1))  # (n, 400)
    magnitudes = mx.fft.rfft(frames * hanning(N_FFT)).abs().square()  # (n, 201)
    mel = magnitudes @ mel_filters(n_mels).T  # (n, n_mels)
    log_spec = mx.maximum(mel, 1e-10).log10()
    log_spec = mx.maximum(log_spec, log_spec.max() - DYNAMIC_RANGE)
    log_spec = (log_spec + 4.0) / 4.0
    mx.eval(log_spec)  # keep no graph (and no input samples) alive behind a yielded block
    return log_spec


def iter_log_mel(
    chunks: Iterable[np.ndarray], n_mels: int = 80, *, block_frames: int = BLOCK_FRAMES
) -> Iterator[mx.array]:
    """Log-mel blocks of (block_frames, n_mels) (the last one shorter) from 16 kHz audio chunks.

    Chunks may have any length (e.g. engine.audio.iter_audio's). The blocks concatenated are the
    log-mel of the concatenated audio: len(audio) // 160 frames, 100 per second.
    """
    queue = _SampleQueue()  # front = sample 160 * emitted - 200 of the (reflect-padded) audio
    n_samples = emitted = 0
    started = False
    block_samples = block_frames * HOP_LENGTH + 2 * PAD - HOP_LENGTH  # frames' reach, with context
    for chunk in chunks:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        n_samples += len(chunk)
        queue.push(chunk)
        if not started:
            # reflect the first 200 samples as mlx_whisper's STFT does, once there are 201
            if queue.size <= PAD:
                continue
            queue.push_front(queue.peek(PAD + 1)[1:][::-1].copy())
            started = True
        while queue.size >= block_samples:
            yield _block(queue.peek(block_samples), block_frames, n_mels)
            queue.drop(block_frames * HOP_LENGTH)
            emitted += block_frames
    if not started:  # under 201 samples in all: reflect what there is, zeros after it
        head = np.concatenate([queue.peek(queue.size), np.zeros(PAD + 1, np.float32)])[: PAD + 1]
        queue.push_front(head[1:][::-1].copy())
    # the tail: zeros after the end, as mlx_whisper.transcribe pads the audio with 30 s of them
    total = n_samples // HOP_LENGTH
    while emitted < total:
        n = min(block_frames, total - emitted)
        need = n * HOP_LENGTH + 2 * PAD - HOP_LENGTH
        if queue.size < need:
            queue.push(np.zeros(need - queue.size, np.float32))
        yield _block(queue.peek(need), n, n_mels)
        queue.drop(n * HOP_LENGTH)
        emitted += n


def log_mel(audio: np.ndarray | mx.array, n_mels: int = 80, *, block_frames: int = BLOCK_FRAMES) -> mx.array:
    """(len(audio) // 160, n_mels) log-mel of in-memory 16 kHz audio, computed block by block."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    blocks = list(iter_log_mel([audio], n_mels, block_frames=block_frames))
    if not blocks:
        return mx.zeros((0, n_mels), dtype=mx.float32)
    return mx.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]

