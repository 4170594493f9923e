"""Many short files through few windows: clips packed end to end, split back by their timestamps.

Whisper's encoder always takes a 30 s window, so a 10-second clip decoded on its own pays for
30 s of encoder (and 1500 frames of cross-attention in every decoding step) to transcribe 10.
Here the short inputs of one call are joined into long "packed" signals, GAP_S of digital silence
between clips, and each packed signal goes through the engine's ordinary long-file path
(engine.transcribe.transcribe_many: regions cut at the quietest points, which are the gaps; full
windows; seek to Whisper's last timestamp). The segments that come back are handed to the clips
by time. Packed signals are always word-aligned for this (words the caller did not ask for are
dropped afterwards): a word belongs to the clip around its middle (the boundary between two clips
is the middle of their gap), a segment whose words fall in two clips is split there, and a segment
without words goes to the clip it overlaps most. Times are then shifted to each clip's origin and
clamped to its duration. Every input still gets its own Transcript (or its own error).

Languages: a window is decoded in one language, so clips are packed only with clips of the same
language. With a forced language or an English-only model that is all of them. Otherwise each
short clip's single window is encoded once and scored (engine.language: language distribution and
P(no speech) from one decoder step); clips are grouped by their likeliest language. A clip that
looks like no speech is not packed: it goes through the ordinary path alone, where Whisper's full
no-speech rule (P(no speech) and the decoded log-probability) decides, so quiet speech is kept
and a packed neighbour's text can never be pulled into a silent clip.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from bisect import bisect_right
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from archive_asr.records import Segment, Transcript, Word
from engine.errors import AudioDecodeError
from engine.options import EngineOptions

SAMPLE_RATE = 16000
MAX_CLIP_S = 25.0  # inputs up to this long are packed; longer ones fill windows by themselves
GAP_S = 1.0  # digital silence between packed clips (see readme_engine.md "Packing": 0.5-2 s measured)
PACK_MAX_S = 600.0  # one packed signal holds at most this much audio (memory of its mel, O(pack))
# On a CPU the encoder dominates, and finding each clip's language costs one encoder window per
# clip, as much as decoding it alone: measured (base, 24 en/ + multi/ clips, words off) 1.42x real
# time packed vs 2.73x unpacked. So clips whose language must be detected are packed only on a GPU,
# where decoding rounds dominate.
PACK_DETECTED_ON_CPU = False
MIN_SAMPLES = 160  # < 10 ms: nothing to transcribe (as engine.transcribe)
NO_SPACE_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}  # Whisper's: words are not space-separated

_inside = contextvars.ContextVar("engine_packing_inside", default=False)


def active() -> bool:
    """True while packing is running (or switched off): transcribe_many must not route here again."""
    return _inside.get()


@contextlib.contextmanager
def unpacked() -> Iterator[None]:
    """Within this block transcribe_many decodes every input in windows of its own (benchmarks)."""
    token = _inside.set(True)
    try:
        yield
    finally:
        _inside.reset(token)


@dataclass(frozen=True)
class Placed:
    """Where one clip sits in its packed signal."""

    slot: int  # position in the caller's list
    offset_s: float
    duration_s: float


def transcribe_packed(
    audios_or_paths: Sequence[np.ndarray | str | Path],
    *,
    model_name: str | None = None,
    options: EngineOptions = EngineOptions(),
    return_exceptions: bool = False,
) -> list:
    """transcribe_many's contract (one Transcript or, with return_exceptions, error per input, in
    order; wall time shared by duration), with inputs of <= MAX_CLIP_S packed into shared windows."""
    from engine import holder
    from engine.transcribe import load_input, transcribe_many

    started = time.perf_counter()
    loaded = holder.get_model(model_name)
    if options.language and not loaded.is_multilingual and options.language.lower() != "en":
        raise ValueError(f"model {loaded.name} is English-only; it cannot transcribe language {options.language!r}")
    outcomes: list = [None] * len(audios_or_paths)
    audios: dict[int, np.ndarray] = {}
    for slot, item in enumerate(audios_or_paths):
        try:
            audios[slot] = load_input(item)
        except AudioDecodeError as e:
            if not return_exceptions:
                raise
            outcomes[slot] = e
    short = [s for s, a in audios.items() if MIN_SAMPLES <= len(a) <= MAX_CLIP_S * SAMPLE_RATE and np.any(a)]
    solo = [s for s in audios if s not in short]  # long, empty or digitally silent: the ordinary path

    groups: dict[str, list[int]] = {}
    scores: dict[int, tuple[str | None, float | None]] = {}  # slot -> reported (language, probability)
    if len(short) < 2 or (loaded.is_multilingual and not options.language and _on_cpu() and not PACK_DETECTED_ON_CPU):
        solo, short = sorted(solo + short), []
    elif loaded.is_multilingual and not options.language:
        scored = _score_languages(loaded, [audios[s] for s in short], options)
        for slot, (decode_as, reported) in zip(short, scored):
            if decode_as is None:
                solo.append(slot)  # no speech by its first window: let Whisper's full rule decide
            else:
                groups.setdefault(decode_as, []).append(slot)
                scores[slot] = reported
    elif short:
        groups[(options.language or "en").lower()] = short

    # One call for everything, so all windows share batches (a call per language would run the
    # languages' rounds one after another: on a GPU rounds, not rows, are what costs time).
    solo.sort()
    packs = [(language, signal, placed) for language, slots in groups.items() for signal, placed in _packs(slots, audios)]
    inputs = [audios[s] for s in solo] + [signal for _, signal, _ in packs]
    languages = [None] * len(solo) + [language for language, _, _ in packs]
    if inputs:
        # Words are what splits a packed signal reliably: without them Whisper sometimes runs one
        # segment across a 1 s gap (measured: base, 1 of 12 English clips lost its text to its
        # neighbours). So packed signals are always aligned; words the caller did not ask for are
        # dropped again below.
        aligned = replace(options, word_timestamps=True) if packs else options
        # A clip must not be read in the context of its neighbours: with the previous text as the
        # prompt, tiny.en turned jfk's "ask not" into "asked not" after another clip. So packed
        # calls decode without previous-text conditioning (a short clip is one window anyway).
        if packs:
            aligned = replace(aligned, condition_on_previous_text=False)
        with unpacked():
            done = transcribe_many(inputs, model_name=model_name, options=aligned, languages=languages)
        for slot, t in zip(solo, done):
            outcomes[slot] = _without_words(t, options)
        for (language, _, placed), packed in zip(packs, done[len(solo) :]):
            for p, segments in zip(placed, split_segments(packed.segments, placed)):
                clip = _clip_transcript(packed, p, segments, language, scores.get(p.slot), options)
                outcomes[p.slot] = _without_words(clip, options)

    wall_s = time.perf_counter() - started
    total_s = sum(len(a) for a in audios.values()) / SAMPLE_RATE or 1.0
    n = max(1, len(audios))
    return [
        o
        if isinstance(o, Exception)
        else replace(o, timing=replace(o.timing, wall_s=wall_s * (o.duration_s / total_s if total_s else 1.0 / n)))
        for o in outcomes
    ]


def split_segments(segments: Sequence[Segment], placed: Sequence[Placed]) -> list[list[Segment]]:
    """A packed signal's segments (time order) -> each clip's, in the clip's own time.

    `placed` in time order. Each clip owns the time from the middle of the gap before it to the
    middle of the gap after it. A word goes to the owner of its middle; a segment whose words have
    two owners is split between them (each piece: its words' span, their text); a segment without
    words goes to the clip it overlaps most. A piece that lies wholly in a gap is dropped (nothing
    was said there: the gap is digital silence); the rest are shifted and clamped to the clip.
    """
    bounds = [(a.offset_s + a.duration_s + b.offset_s) / 2 for a, b in zip(placed[:-1], placed[1:])]

    def owner(t: float) -> int:
        return bisect_right(bounds, t)

    out: list[list[Segment]] = [[] for _ in placed]
    for seg in segments:
        if seg.words:
            pieces: dict[int, list[Word]] = {}
            for w in seg.words:
                pieces.setdefault(owner((w.start_s + w.end_s) / 2), []).append(w)
            if len(pieces) == 1:
                (i,) = pieces
                out[i].append(seg)
            else:
                for i, words in pieces.items():
                    out[i].append(
                        replace(
                            seg,
                            start_s=words[0].start_s,
                            end_s=words[-1].end_s,
                            text="".join(w.word for w in words).strip(),
                            words=tuple(words),
                        )
                    )
        else:
            edges = [float("-inf"), *bounds, float("inf")]
            overlaps = [min(seg.end_s, hi) - max(seg.start_s, lo) for lo, hi in zip(edges[:-1], edges[1:])]
            best = int(np.argmax(overlaps)) if seg.end_s > seg.start_s else owner(seg.start_s)
            out[best].append(seg)
    return [[_shift(s, p) for s in segs if _touches(s, p)] for segs, p in zip(out, placed)]


# ---------------------------------------------------------------------------------------------


def _score_languages(loaded, clips: list[np.ndarray], options: EngineOptions) -> list[tuple[str | None, tuple]]:
    """Per clip: (language to decode it in, or None for no speech; (reported language, probability)).

    Each clip fits one window: encode them in batches, one decoder step each (engine.language)."""
    import mlx.core as mx

    from engine.encode import encode
    from engine.language import pick_language, window_languages
    from engine.memory import plan_batch
    from engine.mel import log_mel
    from engine.windows import window_mel

    threshold = options.no_speech_threshold or 0.6
    batch = plan_batch(loaded.dims, loaded.dtype, batch_size=options.batch_size, word_timestamps=False).batch_size
    out = []
    for i in range(0, len(clips), batch):
        mels = []
        for clip in clips[i : i + batch]:
            mel = log_mel(clip, n_mels=loaded.dims.n_mels)  # (n_frames, n_mels)
            mels.append(window_mel(mel, 0, mel.shape[0])[0])
        features = encode(loaded.model, mx.stack(mels).astype(loaded.dtype))  # (n, n_audio_ctx, n_audio_state)
        for w in window_languages(loaded, features):
            if w.no_speech_prob >= threshold:
                out.append((None, (None, None)))
                continue
            likeliest = max(w.language_probs, key=w.language_probs.get)
            out.append((likeliest, pick_language([w], is_multilingual=True, no_speech_threshold=threshold)))
        del features
    return out


def _packs(slots: list[int], audios: dict[int, np.ndarray]) -> Iterator[tuple[np.ndarray, list[Placed]]]:
    """Packed signals of at most PACK_MAX_S: clips in the caller's order, GAP_S of zeros between."""
    gap = np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)
    parts: list[np.ndarray] = []
    placed: list[Placed] = []
    length = 0
    for slot in slots:
        clip = audios[slot]
        if placed and (length + len(gap) + len(clip)) / SAMPLE_RATE > PACK_MAX_S:
            yield np.concatenate(parts), placed
            parts, placed, length = [], [], 0
        if placed:
            parts.append(gap)
            length += len(gap)
        placed.append(Placed(slot, length / SAMPLE_RATE, len(clip) / SAMPLE_RATE))
        parts.append(clip)
        length += len(clip)
    if placed:
        yield np.concatenate(parts), placed


def _on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def _without_words(t: Transcript, options: EngineOptions) -> Transcript:
    """The transcript as the caller's options asked for it (words dropped if they were not)."""
    if options.word_timestamps:
        return t
    return replace(t, segments=tuple(replace(s, words=()) for s in t.segments), options=options.as_record())


def _touches(seg: Segment, p: Placed) -> bool:
    """Whether any of the segment lies on the clip's audio (not only in the silence around it)."""
    return seg.end_s >= p.offset_s and seg.start_s <= p.offset_s + p.duration_s


def _clamp(t: float, p: Placed) -> float:
    return min(round(max(t - p.offset_s, 0.0), 3), p.duration_s)  # rounded, yet never past the clip


def _shift(seg: Segment, p: Placed) -> Segment:
    words = tuple(replace(w, start_s=_clamp(w.start_s, p), end_s=_clamp(w.end_s, p)) for w in seg.words)
    return replace(seg, start_s=_clamp(seg.start_s, p), end_s=_clamp(seg.end_s, p), words=words)


def _clip_transcript(packed: Transcript, p: Placed, segments: list[Segment], language: str, score, options) -> Transcript:
    """One clip's Transcript from its share of a packed signal's (wall time set by the caller)."""
    joiner = "" if language in NO_SPACE_LANGUAGES else " "
    text = joiner.join(s.text for s in segments).strip()
    if options.language:
        reported = (options.language.lower(), None)
    elif score is not None:
        reported = score
    else:
        reported = (packed.language, packed.language_probability)  # English-only: "en", as unpacked
    if not segments and not options.language:
        reported = (None, None)  # no speech: no language
    return Transcript(
        language=reported[0],
        language_probability=reported[1],
        duration_s=p.duration_s,
        text=text,
        segments=tuple(segments),
        timing=replace(packed.timing, audio_s=p.duration_s),
        options=options.as_record(),
    )
