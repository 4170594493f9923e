"""Helpers for the word / language tests (and benchmarks/compare_words.py): isolated settings for a
whole module, sequential mlx-whisper on our loaded weights, and its windows as engine.words input.

Plain functions and context managers, imported where needed (no pytest plugins).
"""

from __future__ import annotations

import importlib
import itertools
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def isolated_settings(tmp: Path):
    """What conftest's data_dir does, for a module-scoped fixture: own data dir, shared model cache."""
    from archive_asr.settings import get_settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARCHIVE_ASR_DATA_DIR", str(tmp / "data"))
        mp.delenv("ARCHIVE_ASR_DATABASE_URL", raising=False)
        mp.delenv("ARCHIVE_ASR_BROKER_URL", raising=False)
        mp.setenv("ARCHIVE_ASR_MODELS_DIR", str(REPO / ".data" / "test-models"))
        get_settings.cache_clear()
        try:
            yield
        finally:
            get_settings.cache_clear()


def sequential(audio, loaded, *, word_timestamps: bool) -> dict:
    """mlx_whisper.transcribe, default options, on the already loaded model (same weights, heads)."""
    import mlx.core as mx

    mt = importlib.import_module("mlx_whisper.transcribe")
    mt.ModelHolder.model, mt.ModelHolder.model_path = loaded.model, str(loaded.path)
    return mt.transcribe(
        audio, path_or_hf_repo=str(loaded.path), fp16=loaded.dtype == mx.float16, word_timestamps=word_timestamps
    )


def mlx_windows(audio, loaded, result: dict):
    """(encoder output, [WindowTokens]) for the windows of a sequential mlx-whisper result.

    Its segments carry `seek` (the window's first mel frame) and `tokens`; the encoder input is
    rebuilt the way mlx_whisper.transcribe builds it.
    """
    import mlx.core as mx
    from mlx_whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim

    from archive_asr.records import Segment
    from engine.words import WindowTokens

    mel = log_mel_spectrogram(audio, n_mels=loaded.dims.n_mels, padding=N_SAMPLES)
    content = mel.shape[0] - N_FRAMES
    windows, mels = [], []
    for seek, segs in itertools.groupby(result["segments"], key=lambda s: s["seek"]):
        segs = [s for s in segs if s["tokens"]]
        size = min(N_FRAMES, content - seek)
        mels.append(pad_or_trim(mel[seek : seek + size], N_FRAMES, axis=-2))
        windows.append(
            WindowTokens(
                feature_index=len(windows),
                offset_s=seek / 100,
                num_frames=size,
                segments=tuple(Segment(s["start"], s["end"], s["text"], 0.0, 0.0, 0.0, 0.0) for s in segs),
                tokens=tuple(tuple(s["tokens"]) for s in segs),
                language=result["language"],
            )
        )
    features = loaded.model.encoder(mx.stack(mels).astype(loaded.dtype))
    mx.eval(features)
    return features, windows


def assert_words_consistent(segments) -> None:
    """Words inside their segment, start <= end, monotonic and non-overlapping across the file."""
    previous_end = 0.0
    for seg in segments:
        for w in seg.words:
            assert seg.start_s <= w.start_s <= w.end_s <= seg.end_s, (seg, w)
            assert w.start_s >= previous_end, (w, previous_end)
            assert 0.0 <= w.probability <= 1.0
            previous_end = w.end_s
