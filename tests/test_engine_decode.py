"""The batched decoder against mlx_whisper's own decoding, on the real tiny.en and real audio."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fixtures_engine_words import isolated_settings

    with isolated_settings(tmp_path_factory.mktemp("decode")):
        from engine.holder import get_model

        yield get_model("tiny.en")


@pytest.fixture(scope="module")
def jfk_window(tiny, shared_audio):
    """The jfk clip as one encoder input, built as mlx_whisper.transcribe builds it."""
    import mlx.core as mx
    from mlx_whisper.audio import N_SAMPLES, log_mel_spectrogram, pad_or_trim

    from engine.audio import load_audio

    audio = load_audio(shared_audio / "en" / "jfk.flac")
    mel = log_mel_spectrogram(audio, padding=N_SAMPLES)[: len(audio) // 160]
    window = pad_or_trim(mel, 3000, axis=-2)
    features = tiny.model.encoder(window[None])
    mx.eval(features)
    return window, features


def _decode(tiny, features, prompts, temperature=0.0):
    from engine.decode import TokenRules, decode_batch
    from engine.options import EngineOptions

    options = EngineOptions()
    tok = tiny.tokenizer()
    rules = TokenRules(tok, tiny.dims.n_vocab, options)
    return decode_batch(
        tiny.model, [tok] * len(prompts), features, prompts, temperature=temperature, options=options, rules=rules
    )


def test_greedy_decode_matches_mlx_whisper(tiny, jfk_window):
    from mlx_whisper.decoding import DecodingOptions, decode

    window, features = jfk_window
    expected = decode(tiny.model, window, DecodingOptions(fp16=False, language="en"))
    (got,) = _decode(tiny, features, [[]])
    assert list(got.tokens) == expected.tokens
    assert got.text == expected.text
    assert "ask not what your country can do for you" in got.text.lower()
    assert got.avg_logprob == pytest.approx(expected.avg_logprob, abs=0.01)
    assert got.no_speech_prob == pytest.approx(expected.no_speech_prob, abs=1e-3)


def test_rows_with_different_prompts_decode_as_if_alone(tiny, jfk_window):
    """Left padding is invisible: a row decodes the same in a batch of other prompt lengths."""
    import mlx.core as mx

    _, features = jfk_window
    tok = tiny.tokenizer()
    prompt = tok.encode(" We choose to go to the moon in this decade and do the other things.")
    batch = _decode(tiny, mx.concatenate([features] * 3), [[], prompt, prompt[:3]])
    alone = [_decode(tiny, features, [p])[0] for p in ([], prompt, prompt[:3])]
    for b, a in zip(batch, alone):
        assert b.tokens == a.tokens
        assert b.avg_logprob == pytest.approx(a.avg_logprob, abs=1e-3)


def test_timestamps_pair_up_and_never_decrease(tiny, jfk_window):
    """Whisper's timestamp rules hold in every sampled row, even at temperature 1."""
    import mlx.core as mx

    _, features = jfk_window
    ts_begin = tiny.tokenizer().timestamp_begin
    for r in _decode(tiny, mx.concatenate([features] * 4), [[]] * 4, temperature=1.0):
        stamps = [t for t in r.tokens if t >= ts_begin]
        assert r.tokens and r.tokens[0] >= ts_begin  # a window starts with a timestamp
        assert r.tokens[0] - ts_begin <= 50  # ... no later than max_initial_timestamp = 1.0 s
        assert stamps == sorted(stamps)
        assert r.temperature == 1.0
