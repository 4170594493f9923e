"""What a transcription asks of the engine: one frozen dataclass, variants made with `replace(...)`.

Defaults are Whisper's (`mlx_whisper.transcribe` and `DecodingOptions`), so the batched engine is
compared with sequential Whisper on equal terms; the fields below the line are the batched
engine's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EngineOptions:
    # Language of the audio ("en", "de", ...); None = detect it per file from windows with speech.
    language: str | None = None
    # Word-level timestamps (cross-attention + DTW, from the encoder output decoding computed).
    word_timestamps: bool = True
    # Windows per batch; 0 = chosen from the device's memory (engine.memory).
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
    # Each file is cut into regions of about this length (seconds), at the quietest point within
    # cut_search_s of it; each region is decoded like sequential Whisper (seek to the last
    # timestamp, previous text as the prompt) while the regions of all files advance together,
    # one batch row each. Shorter regions = more rows and fewer rounds; longer = fewer joins and
    # more prompt context. Measured (readme_engine.md, tiny.en CPU, WER on the 601 s / 229 s
    # files; sequential 8.12 / 6.68 %): 25 s 7.56 / 5.42 %, 30 s 7.35 / 5.23 %, 60 s 7.91 / 5.42 %.
    # On a GPU decoding rounds, not rows, cost time, so more and shorter regions win (H100, base
    # float16, 601 s file, sequential 7.42 %): 30 s 1621x 7.63 %, 20 s 1599x 7.14 %, 15 s 1888x
    # 7.56 %, 12 s 2103x 6.79 %. None = 30 s on the CPU, 12 s on a GPU.
    region_s: float | None = None
    # Cut points are searched this far either side of the planned boundary (seconds).
    cut_search_s: float = 5.0
    # Check whether every row of a batch has finished once per this many decoding steps
    # (each check waits for the device; between checks steps are queued without waiting).
    check_every: int = 8

    def as_record(self) -> dict:
        """The options as plain data, stored with the transcript."""
        return asdict(self)
