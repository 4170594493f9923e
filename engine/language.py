"""One language per file, from the first windows that hold speech.

mlx_whisper detects the language on the first 30 s, which in an archive is often silence, music
or a jingle. Here one decoder step on `<|startoftranscript|>` for a whole batch of encoded windows
gives, per window, both the language distribution and Whisper's no-speech probability (the
`<|nospeech|>` token at that same position, which is where mlx_whisper's decoding reads it); the
file's language is averaged over its first windows with speech. Below the confidence bar, or with
no speech at all, the answer is None: no invented language.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

NO_SPEECH_THRESHOLD = 0.6  # Whisper's: above this a window is silence
MIN_PROBABILITY = 0.5  # below this the file's language is "undetermined"
MAX_WINDOWS = 3  # speech windows averaged (up to ~90 s): one window of a name or a quote can mislead


@dataclass(frozen=True)
class WindowLanguage:
    """What one decoder step on SOT says about one window."""

    no_speech_prob: float  # P(<|nospeech|>) at the SOT position
    language_probs: dict[str, float] | None  # over language codes; None for English-only models


def window_languages(model, audio_features: mx.array) -> list[WindowLanguage]:
    """Language distribution and no-speech probability of each encoded window, in one step.

    `model` is engine.holder's LoadedModel; `audio_features` (n, n_audio_ctx, n_audio_state).
    """
    n = audio_features.shape[0]
    if n == 0:
        return []
    tokenizer = model.tokenizer()
    sot = mx.full((n, 1), tokenizer.sot, dtype=mx.int32)
    logits = model.model.logits(sot, audio_features)[:, 0].astype(mx.float32)  # (n, n_vocab)
    no_speech = mx.softmax(logits, axis=-1)[:, tokenizer.no_speech]
    if not model.is_multilingual:
        mx.eval(no_speech)
        return [WindowLanguage(float(p), None) for p in np.array(no_speech)]
    # as mlx_whisper.decoding.detect_language: a softmax over the language tokens only
    lang_tokens = mx.array(tokenizer.all_language_tokens)
    lang_probs = mx.softmax(mx.take(logits, lang_tokens, axis=-1), axis=-1)  # (n, n_languages)
    mx.eval(no_speech, lang_probs)
    codes = tokenizer.all_language_codes
    return [
        WindowLanguage(float(p), dict(zip(codes, row.tolist())))
        for p, row in zip(np.array(no_speech), np.array(lang_probs))
    ]


def pick_language(
    windows: Sequence[WindowLanguage],
    *,
    is_multilingual: bool,
    forced: str | None = None,
    no_speech_threshold: float = NO_SPEECH_THRESHOLD,
    min_probability: float = MIN_PROBABILITY,
    max_windows: int = MAX_WINDOWS,
) -> tuple[str | None, float | None]:
    """(language, probability) of one file from its windows in time order.

    A forced language wins (probability None: not measured). English-only models say "en" for a
    file with speech. Otherwise the language distributions of the first `max_windows` windows
    with speech are averaged; a winner below `min_probability` gives (None, its probability), a
    file without speech (None, None).
    """
    if forced:
        return forced.lower(), None
    speech = [w for w in windows if w.no_speech_prob < no_speech_threshold][:max_windows]
    if not speech:
        return None, None
    if not is_multilingual:
        return "en", float(1.0 - min(w.no_speech_prob for w in speech))
    codes = list(speech[0].language_probs)
    mean = np.mean([[w.language_probs[c] for c in codes] for w in speech], axis=0)
    best = int(np.argmax(mean))
    probability = float(mean[best])
    return (codes[best] if probability >= min_probability else None), probability


def detect_language(
    model,
    audio_features: mx.array,
    *,
    forced: str | None = None,
    no_speech_threshold: float = NO_SPEECH_THRESHOLD,
    min_probability: float = MIN_PROBABILITY,
    max_windows: int = MAX_WINDOWS,
) -> tuple[str | None, float | None]:
    """The language of one file from the encoder output of its (first) windows, in time order."""
    if forced:
        return forced.lower(), None
    return pick_language(
        window_languages(model, audio_features),
        is_multilingual=model.is_multilingual,
        no_speech_threshold=no_speech_threshold,
        min_probability=min_probability,
        max_windows=max_windows,
    )
