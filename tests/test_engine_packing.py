"""Short files packed into shared windows (engine.packing): each clip keeps its own text, times,
language and failure. Real tiny.en / base, real clips."""

from __future__ import annotations

import re

import numpy as np
import pytest

from archive_asr.records import Segment, Word

MODEL = "tiny.en"


def _words(text: str) -> str:
    """Lowercase words without punctuation."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split())


def _check_times(t) -> None:
    """Every segment and word inside the clip, words in order and inside their segment."""
    last_end = 0.0
    for s in t.segments:
        assert 0.0 <= s.start_s <= s.end_s <= t.duration_s + 1e-6
        for w in s.words:
            assert s.start_s - 1e-6 <= w.start_s <= w.end_s <= s.end_s + 1e-6
            assert w.start_s >= last_end - 1e-6
            last_end = w.end_s


def _seg(start_s: float, end_s: float, words: tuple[tuple[str, float, float], ...] = (), text: str = "") -> Segment:
    return Segment(
        start_s=start_s,
        end_s=end_s,
        text=text or "".join(w for w, _, _ in words).strip(),
        avg_logprob=-0.2,
        no_speech_prob=0.01,
        compression_ratio=1.2,
        temperature=0.0,
        words=tuple(Word(start_s=a, end_s=b, word=w, probability=0.9) for w, a, b in words),
    )


def test_split_segments_by_words_overlap_and_gaps():
    from engine.packing import Placed, split_segments

    # clip 0: 0-5 s, gap 5-6 s, clip 1: 6-10 s (boundary at 5.5 s)
    placed = [Placed(slot=0, offset_s=0.0, duration_s=5.0), Placed(slot=1, offset_s=6.0, duration_s=4.0)]
    spanning = _seg(3.0, 8.0, ((" last", 3.0, 4.5), (" words.", 4.5, 4.9), (" First", 6.2, 6.6), (" words", 6.6, 7.0)))
    no_words = _seg(4.0, 9.0, text="mostly the second clip")
    in_gap = _seg(5.1, 5.8, text="Thank you.")
    first, second = split_segments([spanning, no_words, in_gap], placed)
    assert [s.text for s in first] == ["last words."]
    assert [s.text for s in second] == ["First words", "mostly the second clip"]
    assert (first[0].start_s, first[0].end_s) == (3.0, 4.9)
    assert (second[0].start_s, second[0].end_s) == pytest.approx((0.2, 1.0))
    assert [w.start_s for w in second[0].words] == pytest.approx([0.2, 0.6])
    assert (second[1].start_s, second[1].end_s) == (0.0, 3.0)  # shifted, clamped at the clip's start


@pytest.mark.slow
def test_packed_clips_keep_their_own_text_times_and_failures(data_dir, shared_audio, tmp_path):
    from engine.errors import AudioDecodeError
    from engine.options import EngineOptions
    from engine.packing import transcribe_packed

    bad = tmp_path / "voicemail.wav"
    bad.write_text("not audio at all")
    en = shared_audio / "en"
    inputs = [
        en / "librispeech_2412-153948-0000.flac",
        en / "jfk.flac",
        bad,
        np.zeros(16000 * 6, np.float32),  # 6 s of digital silence
        en / "timit_LDC93S1.wav",
        en / "librispeech_61-70968-0000.flac",
    ]
    libri, jfk, failed, silent, timit, wizard = transcribe_packed(
        inputs, model_name=MODEL, options=EngineOptions(), return_exceptions=True
    )
    assert isinstance(failed, AudioDecodeError)
    assert "ask not what your country" in _words(jfk.text)
    assert not {"narrative", "antecedents", "greasy", "suit", "wizard"} & set(_words(jfk.text).split())
    assert "leave my native country" in _words(libri.text)
    assert "fellow americans" not in _words(libri.text)
    assert "wizard" in _words(wizard.text) and "country" not in _words(wizard.text)
    assert "all year" in _words(timit.text)
    assert silent.text == "" and silent.segments == () and silent.language is None
    for t in (libri, jfk, timit, wizard):
        _check_times(t)
        assert t.language == "en"
        assert t.segments[-1].words, "word timestamps are on by default"
        assert t.timing.audio_s == t.duration_s and t.timing.wall_s > 0
    assert jfk.duration_s == pytest.approx(11.0, abs=0.05)
    assert jfk.segments[-1].end_s > 9.0  # the clip's own time, not the packed signal's

    with pytest.raises(AudioDecodeError):
        transcribe_packed(inputs, model_name=MODEL, options=EngineOptions(word_timestamps=False))


@pytest.mark.slow
def test_clips_are_packed_by_language(data_dir, shared_audio, monkeypatch):
    from engine import packing
    from engine.options import EngineOptions
    from engine.packing import transcribe_packed

    monkeypatch.setattr(packing, "PACK_DETECTED_ON_CPU", True)  # the GPU's policy, here on the CPU

    multi = shared_audio / "multi"
    inputs = [
        shared_audio / "en" / "jfk.flac",
        multi / "leopard_test_de.wav",
        multi / "leopard_test_es.wav",
        shared_audio / "en" / "librispeech_61-70968-0000.flac",
    ]
    jfk, de, es, wizard = transcribe_packed(inputs, model_name="base", options=EngineOptions(word_timestamps=False))
    assert [t.language for t in (jfk, de, es, wizard)] == ["en", "de", "es", "en"]
    assert all(t.language_probability > 0.5 for t in (jfk, de, es, wizard))
    assert "ask not what your country" in _words(jfk.text)
    assert "wizard" in _words(wizard.text)
    for t in (de, es):
        assert t.text and "country" not in _words(t.text) and "wizard" not in _words(t.text)
        _check_times(t)
