"""Word timestamps for a whole batch of decoded windows at once.

mlx_whisper's `timing.add_word_timestamps` aligns one window at a time and runs the encoder again
for it. Here the encoder output the decoding already computed is reused, and one decoder forward
over `[sot_sequence, no_timestamps, text..., eot]` (padded per window) gives every window's
cross-attention at once. The rest is mlx_whisper's method, its helpers reused where they are
separable: the alignment heads' attention over frames, normalised per head, median-filtered,
averaged, then DTW (`mlx_whisper.timing.dtw`, numba) from text tokens to 20 ms audio tokens; the
punctuation merge (`merge_punctuations`) and the same word-duration heuristics.

Padding is harmless: the decoder's self-attention is causal, so tokens appended after a window's
`eot` cannot change the attention of the tokens before it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Sequence

import mlx.core as mx
import numpy as np
from mlx_whisper.audio import N_FRAMES, TOKENS_PER_SECOND
from mlx_whisper.timing import WordTiming, dtw, median_filter, merge_punctuations
from mlx_whisper.tokenizer import Tokenizer

from archive_asr.records import Segment, Word

# Whisper's defaults (mlx_whisper.transcribe).
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
MEDFILT_WIDTH = 7  # frames of the median filter over each head's attention
MAX_MEDIAN_DURATION_S = 0.7  # the "typical word" never counts as longer than this
# What one sub-batch of the alignment forward may hold (logits + attention); bigger on a GPU.
BUDGET_BYTES = 512 << 20


@dataclass(frozen=True)
class WindowTokens:
    """One decoded window, as the decoder hands it over for word alignment."""

    feature_index: int  # row of `audio_features` that holds this window's encoder output
    offset_s: float  # where the window starts in the file
    num_frames: int  # mel frames of real audio in the window (<= 3000; the rest is padding)
    segments: tuple[Segment, ...]  # decoded from this window, in time order, absolute times
    tokens: tuple[tuple[int, ...], ...]  # per segment, its token ids; only ids < eot are used
    language: str | None = None  # the window's language; None = "en" (English-only models ignore it)
    last_speech_s: float | None = None  # end of speech before this window; None = offset_s


@dataclass
class _Aligned:
    """A window's alignment before the per-segment heuristics."""

    window: WindowTokens
    tokenizer: Tokenizer
    text_tokens: list[list[int]]  # per segment
    timings: list[WordTiming]  # window-relative seconds


def add_word_timestamps(
    model,
    audio_features: mx.array,
    windows: Sequence[WindowTokens],
    *,
    prepend_punctuations: str = PREPEND_PUNCTUATIONS,
    append_punctuations: str = APPEND_PUNCTUATIONS,
    budget_bytes: int = BUDGET_BYTES,
) -> list[tuple[Segment, ...]]:
    """Fill `words` of every window's segments; start_s/end_s follow the words as in Whisper.

    `model` is engine.holder's LoadedModel; `audio_features` the encoder output the windows were
    decoded from, (n, n_audio_ctx, n_audio_state). Returns one tuple of segments per window.
    """
    aligned = [_prepare(model, w) for w in windows]
    todo = [a for a in aligned if any(a.text_tokens)]
    for batch in _sub_batches(model, todo, budget_bytes):
        _align_batch(model, audio_features, batch)
    return [
        _segments_with_words(a, prepend_punctuations, append_punctuations) for a in aligned
    ]


def finalize_words(segments: Sequence[Segment]) -> tuple[Segment, ...]:
    """One file's segments in time order -> words monotonic, non-overlapping, inside their segment.

    Windows are aligned independently (and may overlap where the decoder re-seeks a tail), so the
    last word of one window can reach past the first of the next: clamp, never drop.
    """
    out = []
    floor_s = 0.0  # end of the previous word in the file
    for seg in segments:
        if not seg.words:
            out.append(seg)
            continue
        words = []
        for w in seg.words:
            start_s = min(max(w.start_s, floor_s, seg.start_s), max(seg.end_s, floor_s))
            end_s = max(min(w.end_s, seg.end_s), start_s)
            words.append(replace(w, start_s=start_s, end_s=end_s))
            floor_s = end_s
        # Only when an earlier segment overlaps this one entirely can a word pass its end.
        out.append(replace(seg, end_s=max(seg.end_s, words[-1].end_s), words=tuple(words)))
    return tuple(out)


def _prepare(model, window: WindowTokens) -> _Aligned:
    tokenizer = model.tokenizer(window.language)
    text_tokens = [[t for t in seg if t < tokenizer.eot] for seg in window.tokens]
    return _Aligned(window, tokenizer, text_tokens, [])


def _row(a: _Aligned) -> list[int]:
    tk = a.tokenizer
    return [*tk.sot_sequence, tk.no_timestamps, *itertools.chain(*a.text_tokens), tk.eot]


def _sub_batches(model, todo: list[_Aligned], budget_bytes: int):
    """Windows of similar token length together, each sub-batch within the memory budget."""
    dims = model.model.dims
    n_heads = len(model.alignment_heads)
    # per token row: logits (+ a float32 copy), every layer's cross-attention scores, the heads kept
    per_token = 4 * (2 * dims.n_vocab + (dims.n_text_layer * dims.n_text_head + n_heads) * dims.n_audio_ctx)
    batch: list[_Aligned] = []
    for a in sorted(todo, key=lambda a: len(_row(a))):
        longest = len(_row(a))  # sorted, so the newest is the longest
        if batch and (len(batch) + 1) * longest * per_token > budget_bytes:
            yield batch
            batch = []
        batch.append(a)
    if batch:
        yield batch


def _forward(model, audio_features: mx.array, batch: list[_Aligned]):
    """(token probabilities (b, n_text), attention (b, heads, tokens, n_audio_ctx)), both lazy.

    A function of its own so that the full logits and every layer's attention scores go out of
    scope before evaluation and MLX can free them as soon as they are used.
    """
    rows = [_row(a) for a in batch]
    n_tokens = max(len(r) for r in rows)
    eot = batch[0].tokenizer.eot
    tokens = mx.array([r + [eot] * (n_tokens - len(r)) for r in rows], dtype=mx.int32)  # (b, T)
    index = mx.array([a.window.feature_index for a in batch], dtype=mx.int32)
    xa = mx.take(audio_features, index, axis=0)  # (b, n_audio_ctx, n_audio_state)
    logits, _, cross_qk = model.model.decoder(tokens, xa)

    # probability of each text token where it was predicted (positions sot_len .. sot_len+n-1)
    sot_len = len(batch[0].tokenizer.sot_sequence)
    n_text = n_tokens - sot_len - 2
    targets = tokens[:, sot_len + 1 : sot_len + 1 + n_text]  # (b, n_text)
    text_logits = logits[:, sot_len : sot_len + n_text, :eot].astype(mx.float32)
    picked = mx.take_along_axis(text_logits, mx.minimum(targets, eot - 1)[..., None], axis=-1)[..., 0]
    probs = mx.exp(picked - mx.logsumexp(text_logits, axis=-1))

    # the alignment heads' attention over the window's real frames only (20 ms per audio token)
    heads = [(int(layer), int(head)) for layer, head in model.alignment_heads]
    weights = mx.stack([cross_qk[layer][:, head] for layer, head in heads], axis=1)
    n_audio = mx.array([max(1, a.window.num_frames // 2) for a in batch])
    beyond = mx.arange(weights.shape[-1])[None, None, None, :] >= n_audio[:, None, None, None]
    weights = mx.where(beyond, -mx.inf, weights.astype(mx.float32))
    weights = mx.softmax(weights, axis=-1, precise=True)  # (b, heads, T, n_audio_ctx)
    return probs, weights


def _align_batch(model, audio_features: mx.array, batch: list[_Aligned]) -> None:
    probs, weights = _forward(model, audio_features, batch)
    mx.eval(probs, weights)
    probs, weights = np.array(probs), np.array(weights)
    for i, a in enumerate(batch):
        sot_len = len(a.tokenizer.sot_sequence)
        text = list(itertools.chain(*a.text_tokens))
        n_rows = sot_len + len(text) + 2
        n_audio = max(1, a.window.num_frames // 2)
        w = weights[i, :, :n_rows, :n_audio]  # (heads, tokens, frames)
        std = w.std(axis=-2, keepdims=True)
        w = (w - w.mean(axis=-2, keepdims=True)) / np.maximum(std, 1e-10)
        w = median_filter(w, MEDFILT_WIDTH)
        matrix = w.mean(axis=0)[sot_len:-1]  # rows: no_timestamps + text, each predicting the next
        a.timings = _word_timings(a.tokenizer, text, matrix, probs[i, : len(text)])


def _word_timings(tokenizer: Tokenizer, text: list[int], matrix: np.ndarray, token_probs: np.ndarray):
    """DTW path -> word start/end; the tail of mlx_whisper.timing.find_alignment."""
    text_indices, time_indices = dtw(-matrix.astype(np.float64))
    words, word_tokens = tokenizer.split_to_word_tokens(text + [tokenizer.eot])
    if len(word_tokens) <= 1:
        return []
    word_boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND
    start_times = jump_times[word_boundaries[:-1]]
    end_times = jump_times[word_boundaries[1:]]
    return [
        WordTiming(word, tokens, float(start), float(end), float(np.mean(token_probs[i:j])))
        for word, tokens, start, end, i, j in zip(
            words, word_tokens, start_times, end_times, word_boundaries[:-1], word_boundaries[1:]
        )
    ]


def _segments_with_words(a: _Aligned, prepend: str, append: str) -> tuple[Segment, ...]:
    """mlx_whisper.timing.add_word_timestamps' heuristics on one window's alignment."""
    window, alignment = a.window, a.timings
    if not alignment:
        return tuple(replace(s, words=()) for s in window.segments)
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median_s = min(MAX_MEDIAN_DURATION_S, float(np.median(durations)) if len(durations) else 0.0)
    max_s = median_s * 2

    # truncate long words at sentence boundaries (Whisper's hack, kept for agreement)
    if len(durations):
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > max_s:
                if alignment[i].word in SENTENCE_END_MARKS:
                    alignment[i].end = alignment[i].start + max_s
                elif alignment[i - 1].word in SENTENCE_END_MARKS:
                    alignment[i].start = alignment[i].end - max_s

    merge_punctuations(alignment, prepend, append)

    offset_s = window.offset_s
    last_speech_s = window.offset_s if window.last_speech_s is None else window.last_speech_s
    out = []
    word_index = 0
    for seg, text_tokens in zip(window.segments, a.text_tokens):
        saved_tokens = 0
        words: list[dict] = []
        while word_index < len(alignment) and saved_tokens < len(text_tokens):
            t = alignment[word_index]
            if t.word:
                words.append(
                    dict(
                        word=t.word,
                        start=round(offset_s + t.start, 2),
                        end=round(offset_s + t.end, 2),
                        probability=t.probability,
                    )
                )
            saved_tokens += len(t.tokens)
            word_index += 1
        if not words:
            out.append(replace(seg, words=()))
            continue
        start_s, end_s = seg.start_s, seg.end_s
        # the first words after a pause are not longer than twice the median word
        if words[0]["end"] - last_speech_s > median_s * 4 and (
            words[0]["end"] - words[0]["start"] > max_s
            or (len(words) > 1 and words[1]["end"] - words[0]["start"] > max_s * 2)
        ):
            if len(words) > 1 and words[1]["end"] - words[1]["start"] > max_s:
                boundary = max(words[1]["end"] / 2, words[1]["end"] - max_s)
                words[0]["end"] = words[1]["start"] = boundary
            words[0]["start"] = max(0, words[0]["end"] - max_s)
        # prefer the segment's own start/end timestamp where the edge word is too long
        if start_s < words[0]["end"] and start_s - 0.5 > words[0]["start"]:
            words[0]["start"] = max(0, min(words[0]["end"] - median_s, start_s))
        else:
            start_s = words[0]["start"]
        if end_s > words[-1]["start"] and end_s + 0.5 < words[-1]["end"]:
            words[-1]["end"] = max(words[-1]["start"] + median_s, end_s)
        else:
            end_s = words[-1]["end"]
        last_speech_s = end_s
        records = tuple(Word(w["start"], w["end"], w["word"], float(w["probability"])) for w in words)
        # Whisper may leave the first word starting before its segment: the segment takes it in.
        start_s = min(start_s, records[0].start_s)
        end_s = max(end_s, records[-1].end_s)
        out.append(replace(seg, start_s=start_s, end_s=end_s, words=records))
    return finalize_words(out)
