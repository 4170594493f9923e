"""Word timestamps for a whole batch of decoded windows at once.

mlx_whisper's `timing.add_word_timestamps` aligns one window at a time and runs the encoder again
for it. Here the encoder output the decoding already computed is reused, and one decoder forward
over `[sot_sequence, no_timestamps, text..., eot]` (padded per window) gives every window's
cross-attention at once. The rest is mlx_whisper's method, step for step: the alignment heads'
attention over frames, normalised per head, median-filtered, averaged (on the device, for the
whole batch), then DTW from text tokens to 20 ms audio tokens (mlx_whisper's numba recurrence,
one compiled call over all windows); its punctuation merge (`merge_punctuations`, reused) and
word-duration heuristics. Per window, only the (tokens x frames) matrix reaches the host: the
per-window scipy median filter and DTW calls are what made a first version host-bound on a GPU.

Padding is harmless: the decoder's self-attention is causal, so tokens appended after a window's
`eot` cannot change the attention of the tokens before it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace
from typing import Sequence

import mlx.core as mx
import numba
import numpy as np
from mlx_whisper.audio import TOKENS_PER_SECOND
from mlx_whisper.timing import WordTiming, merge_punctuations
from mlx_whisper.tokenizer import Tokenizer

from archive_asr.records import Segment, Word

log = logging.getLogger(__name__)

# Whisper's defaults (mlx_whisper.transcribe).
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
MEDFILT_WIDTH = 7  # frames of the median filter over each head's attention
MAX_MEDIAN_DURATION_S = 0.7  # the "typical word" never counts as longer than this
# What one sub-batch of the alignment forward may hold (logits + attention), when the caller
# gives no budget: this share of the memory the device still offers, within these bounds.
BUDGET_FRACTION = 0.05
BUDGET_BOUNDS_BYTES = (256 << 20, 4 << 30)


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
    # Optional, per segment: the probability the decoder gave each entry of `tokens`. When every
    # window of a sub-batch has them, the alignment pass skips the vocabulary projection and its
    # softmax (~30 % of its CPU time); otherwise Whisper's are recomputed (no-timestamps context).
    token_probs: tuple[tuple[float, ...], ...] | None = None


@dataclass
class _Aligned:
    """A window's alignment before the per-segment heuristics."""

    window: WindowTokens
    tokenizer: Tokenizer
    text_tokens: list[list[int]]  # per segment
    text_probs: list[float] | None  # the decoder's, for the text tokens in order; None: recompute
    timings: list[WordTiming]  # window-relative seconds


def add_word_timestamps(
    model,
    audio_features: mx.array,
    windows: Sequence[WindowTokens],
    *,
    prepend_punctuations: str = PREPEND_PUNCTUATIONS,
    append_punctuations: str = APPEND_PUNCTUATIONS,
    budget_bytes: int | None = None,
) -> list[tuple[Segment, ...]]:
    """Fill `words` of every window's segments; start_s/end_s follow the words as in Whisper.

    `model` is engine.holder's LoadedModel; `audio_features` the encoder output the windows were
    decoded from, (n, n_audio_ctx, n_audio_state). Returns one tuple of segments per window.
    `budget_bytes` bounds one sub-batch of the alignment forward (default: from the device).
    """
    if budget_bytes is None:
        budget_bytes = default_budget_bytes()
    aligned = [_prepare(model, w) for w in windows]
    todo = [a for a in aligned if any(a.text_tokens)]
    fits = [a for a in todo if len(_row(a)) <= model.dims.n_text_ctx]
    if len(fits) < len(todo):  # Whisper samples at most n_text_ctx / 2 tokens per window
        log.warning("%d window(s) hold more tokens than the decoder's context: no words", len(todo) - len(fits))
    todo = fits
    for batch in _sub_batches(model, todo, budget_bytes):
        _align_batch(model, audio_features, batch)
    return [
        _segments_with_words(a, prepend_punctuations, append_punctuations) for a in aligned
    ]


def default_budget_bytes() -> int:
    """A small share of what the device still offers: alignment runs beside the decoder's batch."""
    from engine.memory import device_memory

    low, high = BUDGET_BOUNDS_BYTES
    return int(min(high, max(low, device_memory().available_bytes * BUDGET_FRACTION)))


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
    text_probs = None
    if window.token_probs is not None:
        pairs = zip(itertools.chain(*window.tokens), itertools.chain(*window.token_probs), strict=True)
        text_probs = [p for t, p in pairs if t < tokenizer.eot]
    return _Aligned(window, tokenizer, text_tokens, text_probs, [])


def _row(a: _Aligned) -> list[int]:
    tk = a.tokenizer
    return [*tk.sot_sequence, tk.no_timestamps, *itertools.chain(*a.text_tokens), tk.eot]


def _sub_batches(model, todo: list[_Aligned], budget_bytes: int):
    """Windows of similar token length together, each sub-batch within the memory budget."""
    dims = model.model.dims
    n_heads = len(model.alignment_heads)
    # per token row: logits (+ a float32 copy), every layer's cross-attention scores, and the
    # alignment heads' weights with the median filter's taps
    per_token = 4 * (
        2 * dims.n_vocab
        + (dims.n_text_layer * dims.n_text_head + n_heads * (MEDFILT_WIDTH + 3)) * dims.n_audio_ctx
    )
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
    """(token probabilities (b, n_text) or None, alignment matrix (b, T, n_audio_ctx)), lazy.

    Everything per window happens here on the device, so that only the (tokens x frames) matrix
    per window crosses to the host. A function of its own so that the full logits and every
    layer's attention scores go out of scope before evaluation and MLX can free them early.
    """
    rows = [_row(a) for a in batch]
    n_tokens = max(len(r) for r in rows)
    eot = batch[0].tokenizer.eot
    tokens = mx.array([r + [eot] * (n_tokens - len(r)) for r in rows], dtype=mx.int32)  # (b, T)
    index = mx.array([a.window.feature_index for a in batch], dtype=mx.int32)
    xa = mx.take(audio_features, index, axis=0)  # (b, n_audio_ctx, n_audio_state)
    # mlx_whisper's TextDecoder.__call__, without a KV cache and stopping before the vocabulary
    # projection, which only Whisper's token probabilities need
    dec = model.model.decoder
    x = dec.token_embedding(tokens) + dec.positional_embedding[:n_tokens]
    cross_qk = []
    for block in dec.blocks:
        x, _, qk = block(x, xa, mask=dec._mask)
        cross_qk.append(qk)

    probs = None
    if any(a.text_probs is None for a in batch):
        # probability of each text token where it was predicted (positions sot_len .. sot_len+n-1)
        sot_len = len(batch[0].tokenizer.sot_sequence)
        n_text = n_tokens - sot_len - 2
        hidden = dec.ln(x[:, sot_len : sot_len + n_text])
        text_logits = dec.token_embedding.as_linear(hidden)[..., :eot].astype(mx.float32)
        targets = tokens[:, sot_len + 1 : sot_len + 1 + n_text]  # (b, n_text)
        picked = mx.take_along_axis(text_logits, mx.minimum(targets, eot - 1)[..., None], axis=-1)[..., 0]
        probs = mx.exp(picked - mx.logsumexp(text_logits, axis=-1))

    # the alignment heads' attention over the window's real frames only (20 ms per audio token)
    heads = [(int(layer), int(head)) for layer, head in model.alignment_heads]
    weights = mx.stack([cross_qk[layer][:, head] for layer, head in heads], axis=1)  # (b, H, T, F)
    n_frames = weights.shape[-1]
    n_audio = np.array([max(1, a.window.num_frames // 2) for a in batch])
    beyond = mx.arange(n_frames)[None, None, None, :] >= mx.array(n_audio)[:, None, None, None]
    weights = mx.where(beyond, -mx.inf, weights.astype(mx.float32))
    weights = mx.softmax(weights, axis=-1, precise=True)

    # normalise each head over the window's own tokens (padding rows excluded)
    n_rows = mx.array([len(r) for r in rows])
    valid = (mx.arange(n_tokens)[None, :] < n_rows[:, None])[:, None, :, None]  # (b, 1, T, 1)
    count = n_rows[:, None, None, None].astype(mx.float32)
    mean = mx.where(valid, weights, 0.0).sum(axis=-2, keepdims=True) / count
    var = mx.where(valid, (weights - mean) ** 2, 0.0).sum(axis=-2, keepdims=True) / count
    weights = (weights - mean) / mx.maximum(mx.sqrt(var), 1e-10)

    weights = _median_filter(weights, n_audio)
    return probs, weights.mean(axis=1)  # (b, T, F): mean over the alignment heads


def _median_filter(weights: mx.array, n_audio: np.ndarray) -> mx.array:
    """mlx_whisper's median_filter along frames, for a batch: (b, H, T, F), window i's audio in
    its first n_audio[i] frames, reflected at that edge as mlx_whisper reflects its sliced matrix.

    One gather builds the padded rows, the taps are slices of it, and a 13-comparison network
    picks the median (a sort of the taps costs far more on a CPU).
    """
    pad = MEDFILT_WIDTH // 2
    n_frames = weights.shape[-1]
    padded = mx.take_along_axis(weights, mx.array(_padded_frames(n_audio, n_frames))[:, None, None, :], axis=-1)
    filtered = _median7([padded[..., k : k + n_frames] for k in range(2 * pad + 1)])
    # windows too short to filter keep their values, as mlx_whisper's median_filter leaves them
    return mx.where(mx.array(n_audio <= pad)[:, None, None, None], weights, filtered)


def _padded_frames(n_audio: np.ndarray, n_frames: int) -> np.ndarray:
    """(b, n_frames + 6): frame index of each padded position, reflected inside [0, n_audio[i]).

    Positions past the reflection serve only frames beyond the window's audio (discarded later).
    """
    pad = MEDFILT_WIDTH // 2
    n = n_audio[:, None]
    g = np.arange(-pad, n_frames + pad)[None, :].repeat(len(n_audio), axis=0)
    out = np.clip(g, 0, n_frames - 1)
    out = np.where(g < 0, -g, out)  # reflect at 0
    right = (g >= n) & (g < n + pad)
    out = np.where(right, 2 * (n - 1) - g, out)  # reflect at the window's last frame
    return np.clip(out, 0, n_frames - 1).astype(np.int32)


def _median7(p: list[mx.array]) -> mx.array:
    """Element-wise median of 7 arrays (Devillard's opt_med7 sorting network)."""
    assert MEDFILT_WIDTH == 7 and len(p) == 7

    def sort2(i: int, j: int) -> None:
        p[i], p[j] = mx.minimum(p[i], p[j]), mx.maximum(p[i], p[j])

    for i, j in ((0, 5), (0, 3), (1, 6), (2, 4), (0, 1), (3, 5), (2, 6), (2, 3), (3, 6), (4, 5), (1, 4), (1, 3), (3, 4)):
        sort2(i, j)
    return p[3]


def _align_batch(model, audio_features: mx.array, batch: list[_Aligned]) -> None:
    probs, matrices = _forward(model, audio_features, batch)
    mx.eval(matrices, *([probs] if probs is not None else []))
    matrices = np.array(matrices)
    if probs is None:
        probs = [a.text_probs for a in batch]
    else:
        probs = np.array(probs)
    texts = [list(itertools.chain(*a.text_tokens)) for a in batch]
    sot_len = len(batch[0].tokenizer.sot_sequence)
    # rows: no_timestamps + text (each row is the token that predicts the next); real frames only
    shapes = np.array([(len(t) + 1, max(1, a.window.num_frames // 2)) for t, a in zip(texts, batch)])
    paths, lengths = _dtw_batch(-matrices[:, sot_len:], shapes)
    for i, (a, text) in enumerate(zip(batch, texts)):
        text_indices, time_indices = paths[i, : lengths[i]].T
        a.timings = _word_timings(a.tokenizer, text, text_indices, time_indices, np.asarray(probs[i][: len(text)]))


def warm_up() -> None:
    """Compile the DTW (or load it from numba's cache) before the first round needs it, with the
    argument types `_align_batch` passes. Compiling took 4.4 s on a 2-core CPU and ~5 s inside an
    H200 worker's first round, 64 rows waiting; loading the cached code 0.2 s."""
    _dtw_batch(np.zeros((1, 2, 2), np.float32), np.array([[1, 2]], np.int64))


@numba.njit(cache=True, nogil=True)
def _dtw_batch(costs: np.ndarray, shapes: np.ndarray):
    """mlx_whisper.timing.dtw for every window at once (one compiled call, no per-window overhead).

    costs (b, N, M), window i using costs[i, :n_i, :m_i]; returns paths (b, N + M, 2) of
    (text index, time index), in order, and their lengths. Same recurrence and tie-breaking.
    """
    b = costs.shape[0]
    paths = np.zeros((b, costs.shape[1] + costs.shape[2], 2), dtype=np.int64)
    lengths = np.zeros(b, dtype=np.int64)
    for w in range(b):
        n, m = shapes[w, 0], shapes[w, 1]
        cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
        trace = np.full((n + 1, m + 1), -1, dtype=np.int8)
        cost[0, 0] = 0
        for i in range(1, n + 1):
            for j in range(1, m + 1):
                c0 = cost[i - 1, j - 1]
                c1 = cost[i - 1, j]
                c2 = cost[i, j - 1]
                if c0 < c1 and c0 < c2:
                    c, t = c0, 0
                elif c1 < c0 and c1 < c2:
                    c, t = c1, 1
                else:
                    c, t = c2, 2
                cost[i, j] = costs[w, i - 1, j - 1] + c
                trace[i, j] = t
        trace[0, :] = 2
        trace[:, 0] = 1
        i, j, k = n, m, 0
        while i > 0 or j > 0:
            paths[w, k, 0] = i - 1
            paths[w, k, 1] = j - 1
            k += 1
            if trace[i, j] == 0:
                i -= 1
                j -= 1
            elif trace[i, j] == 1:
                i -= 1
            else:
                j -= 1
        paths[w, :k] = paths[w, :k][::-1].copy()
        lengths[w] = k
    return paths, lengths


def _word_timings(tokenizer: Tokenizer, text: list[int], text_indices, time_indices, token_probs):
    """DTW path -> word start/end; the tail of mlx_whisper.timing.find_alignment."""
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
