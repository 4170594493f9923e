"""One file's log-mel (engine.mel): sequential Whisper's input exactly, clamped at the whole file's
maximum, computed block by block with bounded memory."""

from __future__ import annotations

import os

import numpy as np
import pytest

import engine  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram

from engine import mel as engine_mel


@pytest.fixture(scope="module")
def speech(shared_audio) -> np.ndarray:
    from engine.audio import load_audio

    return load_audio(shared_audio / "longform" / "ljspeech_LJ001-0001_to_0032_concat.wav")[: 16000 * 75]


def _sequential_window(reference: np.ndarray, seek: int) -> np.ndarray:
    """The window mlx_whisper.transcribe decodes at `seek`: frames from the whole-file mel, zero-padded."""
    content = reference.shape[0] - N_FRAMES
    window = reference[seek : seek + min(N_FRAMES, content - seek)]
    return np.pad(window, [(0, N_FRAMES - len(window)), (0, 0)])


@pytest.mark.parametrize("chunk", [7777, 16000 * 30, 123_457])
def test_every_window_equals_mlx_whisper_transcribe_input(speech, chunk):
    reference = np.array(log_mel_spectrogram(speech, n_mels=80, padding=N_SAMPLES))
    fm = engine_mel.file_mel((speech[i : i + chunk] for i in range(0, len(speech), chunk)), 80)
    assert fm.content_frames == reference.shape[0] - N_FRAMES == len(speech) // 160
    for seek in (0, 1234, 3000, fm.content_frames - 700):
        window, size = fm.window(seek, fm.content_frames)
        assert size == min(N_FRAMES, fm.content_frames - seek)
        np.testing.assert_allclose(window, _sequential_window(reference, seek), atol=1e-5)
    np.testing.assert_allclose(fm.detection_window(), reference[:N_FRAMES], atol=1e-5)


def test_a_quiet_stretch_is_clamped_at_the_whole_files_maximum(speech):
    """A block 60 dB quieter than the rest: per-block clamping would lift its floor; Whisper's
    clamp (and so ours) is 8 log10 units below the loudest frame of the whole file."""
    quiet = speech.copy()
    quiet[16000 * 40 : 16000 * 70] *= 1e-3
    reference = np.array(log_mel_spectrogram(quiet, n_mels=80, padding=N_SAMPLES))
    fm = engine_mel.file_mel([quiet], 80)
    window, _ = fm.window(4500, fm.content_frames)
    np.testing.assert_allclose(window, _sequential_window(reference, 4500), atol=1e-5)
    floor = (fm.max_log10 - engine_mel.DYNAMIC_RANGE + 4) / 4
    assert window.min() == pytest.approx(floor, abs=1e-5)


def test_a_short_clip_has_its_detection_window_of_padding_frames():
    audio = (0.1 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)  # 1 s
    reference = np.array(log_mel_spectrogram(audio, n_mels=80, padding=N_SAMPLES))
    fm = engine_mel.file_mel([audio], 80)
    assert fm.content_frames == 100
    window, size = fm.window(0, fm.content_frames)
    assert size == 100 and not window[100:].any()  # decoding: zeros after the audio
    np.testing.assert_allclose(fm.detection_window(), reference[:N_FRAMES], atol=1e-5)  # detection: padding frames


def test_digital_silence_is_flat_and_speech_is_not(speech):
    audio = np.concatenate([np.zeros(16000 * 3, np.float32), speech[: 16000 * 5]])
    fm = engine_mel.file_mel([audio], 80)
    assert fm.flat[10:290].all()
    assert not fm.flat[320:].any()


def test_a_long_file_goes_to_a_temporary_file(speech, monkeypatch):
    monkeypatch.setattr(engine_mel, "IN_MEMORY_FRAMES", 4000)
    fm = engine_mel.file_mel((speech for _ in range(3)), 80)  # 225 s, mapped from disk
    assert isinstance(fm.log10, np.memmap) and fm.store_path is not None
    assert fm.content_frames == 3 * len(speech) // 160
    in_memory = engine_mel.file_mel([np.concatenate([speech] * 3)], 80)
    np.testing.assert_allclose(fm.window(10_000, fm.content_frames)[0], in_memory.window(10_000, fm.content_frames)[0], atol=1e-5)
    path = fm.store_path
    fm.close()
    assert not os.path.exists(path)
