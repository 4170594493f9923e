"""What a transcription asks of the engine: one frozen dataclass, variants made with `replace(...)`.

Defaults are Whisper's (`mlx_whisper.transcribe` and `DecodingOptions`), so the batched engine is
compared with sequential Whisper on equal terms; the fields below the line are the batched
engine's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EngineOptions:
    # Language of the audio ("en", "de", ...); None = detect it per file from its first 30 s, as mlx_whisper does.
    language: str | None = None
    # Word-level timestamps (cross-attention + DTW, from the encoder output decoding computed).
    word_timestamps: bool = True
    # Batch rows (files decoded together); 0 = chosen from the device's memory (engine.memory).
    batch_size: int = 0
    # "transcribe" (X -> X) or "translate" (X -> English; multilingual models only).
    task: str = "transcribe"

    # Temperatures tried in turn for a window whose output fails the thresholds below.
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    # gzip compression ratio above this = a repetition loop: decode the window again, hotter.
    compression_ratio_threshold: float | None = 2.4
    # Average log-probability of the sampled tokens below this = unsure: decode again, hotter.
    logprob_threshold: float | None = -1.0
    # P(no speech) above this AND average log-probability below logprob_threshold = silence:
    # the window produces no text (and skips the fallback).
    no_speech_threshold: float | None = 0.6
    # Feed each region's previous text (since the last hot fallback) as the prompt, as sequential
    # Whisper does; keeps spelling and punctuation consistent from window to window.
    condition_on_previous_text: bool = True
    # Text for the first window of every file (vocabulary, names); None = no prompt.
    initial_prompt: str | None = None
    # Suppress the blank and <|endoftext|> as the first sampled token (always true here: timestamps
    # are on, so the first token is a timestamp; kept for the record of the options used).
    suppress_blank: bool = True
    # Token ids never sampled; "-1" = Whisper's set of non-speech symbols.
    suppress_tokens: str = "-1"
    # The first timestamp of a window may not be later than this (seconds).
    max_initial_timestamp: float | None = 1.0
    # Most tokens sampled per window (Whisper: n_text_ctx // 2 = 224).
    sample_len: int | None = None

    # ---- the batched engine's own ----
    # Check whether every row of a batch has finished once per this many decoding steps
    # (each check waits for the device; between checks steps are queued without waiting).
    check_every: int = 8

    def as_record(self) -> dict:
        """The options as plain data, stored with the transcript."""
        return asdict(self)
