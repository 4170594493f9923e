"""Log-mel in blocks (engine.mel): Whisper's framing exactly, per-block clamping, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
from mlx_whisper.audio import HOP_LENGTH, N_FFT, N_SAMPLES, hanning, log_mel_spectrogram, mel_filters, stft

from engine import mel as engine_mel


def _unclamped_reference(audio: np.ndarray) -> np.ndarray:
    """mlx_whisper's log-mel of the audio as mlx_whisper.transcribe pads it, before the clamp."""
    x = mx.pad(mx.array(audio), (0, N_SAMPLES))
    spec = stft(x, hanning(N_FFT), nperseg=N_FFT, noverlap=HOP_LENGTH)[:-1].abs().square()
    log_spec = mx.maximum(spec @ mel_filters(80).T, 1e-10).log10()
    return np.array((log_spec + 4.0) / 4.0)[: len(audio) // HOP_LENGTH]


@pytest.fixture(scope="module")
def speech(shared_audio) -> np.ndarray:
    from engine.audio import load_audio

    return load_audio(shared_audio / "longform" / "ljspeech_LJ001-0001_to_0032_concat.wav")[: 16000 * 75]


def test_framing_equals_mlx_whisper(speech, monkeypatch):
    monkeypatch.setattr(engine_mel, "DYNAMIC_RANGE", 1e9)  # compare the frames, not the clamp
    for n in (0, 120, 160, 200, 201, 999, 480_000, 480_161, len(speech)):
        got = np.array(engine_mel.log_mel(speech[:n]))
        want = _unclamped_reference(speech[:n]) if n else np.zeros((0, 80))
        assert got.shape == (n // 160, 80)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_one_block_is_whisper_log_mel(speech):
    """Up to 30 s the block is the whole clip: Whisper's own clamp at (max - 8) applies."""
    clip = speech[: 16000 * 25]
    want = np.array(log_mel_spectrogram(clip, padding=N_SAMPLES))[: len(clip) // 160]
    np.testing.assert_allclose(np.array(engine_mel.log_mel(clip)), want, atol=1e-5)


def test_clamped_per_30_s_block(speech):
    quiet = speech.copy()
    quiet[: 16000 * 30] *= 1e-5  # a first half-minute 100 dB down: its own floor, not the file's
    mel = np.array(engine_mel.log_mel(quiet))
    for start in range(0, len(mel), engine_mel.BLOCK_FRAMES):
        block = mel[start : start + engine_mel.BLOCK_FRAMES]
        assert block.min() >= block.max() - 2.0 - 1e-6  # 8 log10 units = 2.0 after (x + 4) / 4
    # a clamp over the whole file would have lifted the quiet block to (file max - 2.0)
    assert mel[:3000].min() < mel.max() - 2.0 - 0.5


def test_streamed_chunks_of_any_size_equal_in_memory(speech):
    whole = np.array(engine_mel.log_mel(speech))
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.integers(0, len(speech), 40))
    chunks = np.split(speech, np.sort(np.concatenate([cuts, [100, 101, 16000 * 30]])))  # tiny ones too
    blocks = list(engine_mel.iter_log_mel(chunks))
    assert all(b.shape[0] == engine_mel.BLOCK_FRAMES for b in blocks[:-1])
    np.testing.assert_array_equal(np.concatenate([np.array(b) for b in blocks]), whole)


def test_peak_memory_does_not_grow_with_length(speech):
    """2.5 minutes vs 50 minutes streamed: the same peak, in MLX and in numpy (blocks are let go)."""
    import tracemalloc

    def stream_peak(repeats: int) -> tuple[int, int]:
        mx.eval(mx.zeros(1))
        mx.clear_cache()
        mx.reset_peak_memory()
        tracemalloc.start()
        frames = 0
        # a fresh copy per chunk, as a decoder yields them: keeping any would show in the peak
        for block in engine_mel.iter_log_mel(speech.copy() for _ in range(repeats)):
            frames += block.shape[0]
        numpy_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert frames == repeats * len(speech) // 160
        return mx.get_peak_memory(), numpy_peak

    (mlx_short, np_short), (mlx_long, np_long) = stream_peak(2), stream_peak(40)
    assert mlx_long <= 1.1 * mlx_short
    assert np_long <= 1.1 * np_short
