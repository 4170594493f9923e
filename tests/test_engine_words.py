"""Word timestamps in batch (engine.words) against sequential mlx-whisper, on the real tiny.en."""

from __future__ import annotations

import pytest

from archive_asr.records import Segment, Word
from tests.fixtures_engine_words import assert_words_consistent, isolated_settings, mlx_windows, sequential


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with isolated_settings(tmp_path_factory.mktemp("words")):
        from engine.holder import get_model

        yield get_model("tiny.en")


@pytest.fixture(scope="module")
def clips(shared_audio):
    from engine.audio import load_audio

    return {
        "jfk": load_audio(shared_audio / "en" / "jfk.flac"),
        "libri": load_audio(shared_audio / "en" / "librispeech_1221-135766-0002.wav"),
    }


@pytest.fixture(scope="module")
def jfk_sequential(tiny, clips):
    return sequential(clips["jfk"], tiny, word_timestamps=True)


def _words(segments):
    return [w for s in segments for w in s.words]


@pytest.mark.slow
def test_same_windows_give_sequential_word_times(tiny, clips, jfk_sequential):
    from engine.words import add_word_timestamps

    features, windows = mlx_windows(clips["jfk"], tiny, jfk_sequential)
    [segments] = add_word_timestamps(tiny, features, windows)
    ours = _words(segments)
    theirs = [w for s in jfk_sequential["segments"] for w in s["words"]]
    assert [w.word for w in ours] == [w["word"] for w in theirs]
    for a, b in zip(ours, theirs):
        assert a.start_s == pytest.approx(b["start"], abs=0.021)
        assert a.end_s == pytest.approx(b["end"], abs=0.021)
        assert a.probability == pytest.approx(b["probability"], abs=0.02)
    assert_words_consistent(segments)


@pytest.mark.slow
def test_engine_places_country_where_sequential_does(tiny, clips, jfk_sequential):
    from engine.options import EngineOptions
    from engine.transcribe import transcribe_audio

    transcript = transcribe_audio(clips["jfk"], model_name="tiny.en", options=EngineOptions(word_timestamps=True))
    assert_words_consistent(transcript.segments)
    country = [w for w in _words(transcript.segments) if w.word.strip(" ,.").lower() == "country"]
    reference = [w for s in jfk_sequential["segments"] for w in s["words"] if w["word"].strip(" ,.").lower() == "country"]
    assert len(country) == len(reference) == 2
    for ours, theirs in zip(country, reference):
        assert abs(ours.start_s - theirs["start"]) <= 0.3
        assert abs(ours.end_s - theirs["end"]) <= 0.3


@pytest.mark.slow
def test_batch_of_windows_equals_one_window_at_a_time(tiny, clips, jfk_sequential):
    """Padding rows to a common length and sharing one forward changes nothing."""
    import mlx.core as mx

    from engine.words import add_word_timestamps

    libri = sequential(clips["libri"], tiny, word_timestamps=False)
    f1, w1 = mlx_windows(clips["jfk"], tiny, jfk_sequential)
    f2, w2 = mlx_windows(clips["libri"], tiny, libri)
    from dataclasses import replace

    batch = [w1[0], replace(w2[0], feature_index=1)]
    together = add_word_timestamps(tiny, mx.concatenate([f1, f2]), batch)
    alone = add_word_timestamps(tiny, f1, w1) + add_word_timestamps(tiny, f2, w2)
    for a, b in zip(together, alone):
        assert [(w.word, w.start_s, w.end_s) for w in _words(a)] == [(w.word, w.start_s, w.end_s) for w in _words(b)]
        assert [w.probability for w in _words(a)] == pytest.approx([w.probability for w in _words(b)], abs=1e-4)
    libri_words = _words(together[1])
    assert len(libri_words) > 10
    # punctuation rides on the word before it, as in Whisper
    assert any(w.word.endswith((",", ".")) for w in libri_words)
    assert not any(w.word.strip() in {",", ".", "?", "!"} for w in libri_words)


@pytest.mark.slow
def test_one_token_and_empty_windows(tiny, clips, jfk_sequential):
    from engine.words import WindowTokens, add_word_timestamps

    features, [jfk] = mlx_windows(clips["jfk"], tiny, jfk_sequential)
    and_ = tuple(tiny.tokenizer().encode(" And"))
    assert len(and_) == 1
    seg = Segment(0.0, 1.0, "And", -0.1, 0.0, 1.0, 0.0)
    # the first second of jfk.flac holds "And": a window of 100 mel frames with that one token
    one = WindowTokens(feature_index=0, offset_s=0.0, num_frames=100, segments=(seg,), tokens=(and_,))
    empty = WindowTokens(feature_index=0, offset_s=0.0, num_frames=jfk.num_frames, segments=(seg,), tokens=((),))
    tiny_window = WindowTokens(feature_index=0, offset_s=0.0, num_frames=1, segments=(seg,), tokens=(and_,))
    [(a,), (b,), (c,)] = add_word_timestamps(tiny, features, [one, empty, tiny_window])
    assert [w.word for w in a.words] == [" And"]
    assert 0.0 <= a.words[0].start_s < a.words[0].end_s <= 1.0
    assert_words_consistent([a])
    assert b.words == () and b == seg
    assert [w.word for w in c.words] == [" And"]  # a window of one mel frame: no crash
    assert_words_consistent([c])


def test_finalize_words_clamps_across_windows():
    """Windows aligned apart may overlap at their join: clamp into order, drop nothing."""
    from engine.words import finalize_words

    w = lambda s, e, t: Word(s, e, t, 0.9)  # noqa: E731
    first = Segment(0.0, 5.0, "a b", -0.1, 0.0, 1.0, 0.0, words=(w(0.5, 1.0, " a"), w(1.0, 5.4, " b")))
    second = Segment(4.8, 9.0, "c d", -0.1, 0.0, 1.0, 0.0, words=(w(4.6, 5.2, " c"), w(5.2, 6.0, " d")))
    out = finalize_words([first, second])
    assert_words_consistent(out)
    assert [x.word for s in out for x in s.words] == [" a", " b", " c", " d"]
    assert out[0].words[1].end_s == 5.0  # inside its segment
    assert out[1].words[0].start_s == 5.0  # after the previous word
    assert out[1].words[1] == second.words[1]  # untouched where nothing is wrong


@pytest.mark.slow
def test_decoder_probabilities_skip_the_vocabulary_pass(tiny, clips, jfk_sequential):
    """Given the decoder's token probabilities, the times are the same and the words carry them."""
    from dataclasses import replace

    from engine.words import add_word_timestamps

    features, [jfk] = mlx_windows(clips["jfk"], tiny, jfk_sequential)
    given = replace(jfk, token_probs=tuple(tuple(0.5 for _ in seg) for seg in jfk.tokens))
    [recomputed], [from_decoder] = add_word_timestamps(tiny, features, [jfk]), add_word_timestamps(tiny, features, [given])
    assert [(w.word, w.start_s, w.end_s) for w in _words(from_decoder)] == [
        (w.word, w.start_s, w.end_s) for w in _words(recomputed)
    ]
    assert {w.probability for w in _words(from_decoder)} == {0.5}


def test_median_filter_matches_mlx_whisper_per_window():
    """The on-device filter reflects at each window's own edge, as mlx_whisper's does per window."""
    import mlx.core as mx
    import numpy as np
    from mlx_whisper.timing import median_filter

    from engine.words import _median_filter

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 2, 5, 40)).astype(np.float32)
    x[0, :, :, 7] = x[0, :, :, 8]  # ties
    n_audio = np.array([40, 11, 3, 4, 5, 1, 39, 8])
    got = np.array(_median_filter(mx.array(x), n_audio))
    for i, n in enumerate(n_audio):
        np.testing.assert_array_equal(got[i, :, :, :n], median_filter(x[i, :, :, :n], 7))
