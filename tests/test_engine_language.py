"""Language per file (engine.language) with the real multilingual base and English-only tiny.en."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures_engine_words import isolated_settings

# clip -> its language; the ones issue 4 calls clear, plus pt, ko, sv
CLIPS = {
    "leopard_test_de.wav": "de",
    "leopard_test_es.wav": "es",
    "leopard_test_fr.wav": "fr",
    "leopard_test_it.wav": "it",
    "leopard_test_ja.wav": "ja",
    "coqui_ru.wav": "ru",
    "aishell_zh_BAC009S0724W0121.wav": "zh",
    "leopard_test_pt.wav": "pt",
    "leopard_test_ko.wav": "ko",
    "nst_sv_se10x016-08071999-1334_u0016003.wav": "sv",
}
N_SILENCE = 2  # rows of silence and noise appended after the clips


@pytest.fixture(scope="module")
def models_env(tmp_path_factory):
    with isolated_settings(tmp_path_factory.mktemp("language")):
        yield


def _first_windows(audios: list[np.ndarray], n_mels: int):
    """(n, 3000, n_mels): each audio's first 30 s window, as the engine pads it."""
    import mlx.core as mx
    from mlx_whisper.audio import N_FRAMES, pad_or_trim

    from engine.mel import file_mel

    return mx.stack([mx.array(file_mel([a], n_mels).window(0, N_FRAMES)[0]) for a in audios])


def _silence_and_noise() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [np.zeros(16000 * 20, np.float32), (0.05 * rng.standard_normal(16000 * 20)).astype(np.float32)]


@pytest.fixture(scope="module")
def base_windows(models_env, shared_audio):
    """Every clip's window scored in ONE batched decoder step."""
    from engine.audio import load_audio
    from engine.holder import get_model
    from engine.language import window_languages

    base = get_model("base")
    audios = [load_audio(shared_audio / "multi" / name) for name in CLIPS] + _silence_and_noise()
    features = base.model.encoder(_first_windows(audios, base.dims.n_mels).astype(base.dtype))
    return window_languages(base, features)


@pytest.mark.slow
@pytest.mark.parametrize("index,name", list(enumerate(CLIPS)))
def test_clip_comes_out_in_its_language(base_windows, index, name):
    from engine.language import pick_language

    language, probability = pick_language([base_windows[index]], is_multilingual=True)
    assert language == CLIPS[name]
    assert probability >= 0.5


@pytest.mark.slow
def test_silence_and_noise_get_no_language(base_windows):
    from engine.language import pick_language

    for w in base_windows[-N_SILENCE:]:
        assert w.no_speech_prob > 0.6
        assert pick_language([w], is_multilingual=True) == (None, None)


@pytest.mark.slow
def test_language_comes_from_the_first_speech_window_not_the_first_window(base_windows):
    """A file that opens with silence and noise: decided by the German that follows."""
    from engine.language import pick_language

    silence, noise = base_windows[-2:]
    german, french = base_windows[0], base_windows[2]
    assert pick_language([silence, noise, german, french], is_multilingual=True, max_windows=1)[0] == "de"
    assert pick_language([silence, german], is_multilingual=True, forced="FR") == ("fr", None)
    # averaged over the first speech windows: one German and one French window cannot both pass
    mixed, p = pick_language([german, french], is_multilingual=True)
    assert mixed is None and p < 0.55


@pytest.mark.slow
def test_english_only_model_says_en_for_speech_and_none_for_silence(models_env, shared_audio):
    from engine.audio import load_audio
    from engine.holder import get_model
    from engine.language import detect_language

    tiny = get_model("tiny.en")
    audios = [load_audio(shared_audio / "en" / "jfk.flac")] + _silence_and_noise()
    features = tiny.model.encoder(_first_windows(audios, tiny.dims.n_mels).astype(tiny.dtype))
    language, probability = detect_language(tiny, features[:1])
    assert language == "en" and probability > 0.5
    assert detect_language(tiny, features[1:]) == (None, None)


def test_pick_language_without_windows_or_below_the_bar():
    from engine.language import WindowLanguage, pick_language

    assert pick_language([], is_multilingual=True) == (None, None)
    unsure = WindowLanguage(0.1, {"de": 0.45, "nl": 0.40, "en": 0.15})
    assert pick_language([unsure], is_multilingual=True) == (None, pytest.approx(0.45))
    sure = WindowLanguage(0.1, {"de": 0.90, "nl": 0.05, "en": 0.05})
    assert pick_language([sure, unsure], is_multilingual=True) == ("de", pytest.approx(0.675))
