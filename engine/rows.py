"""One batch row's life as sequential Whisper lives it: a window from the seek point, its segments,
the next seek, the next prompt. Pure functions over one window's decoded tokens, mirroring
mlx_whisper.transcribe's loop body line for line, so that a row decodes a file (or a region of
one) exactly as sequential Whisper decodes the whole file.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import numpy as np
from mlx_whisper.audio import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, SAMPLE_RATE

from archive_asr.records import Segment
from engine.decode import WindowResult, compression_ratio
from engine.mel import FileMel
from engine.options import EngineOptions

INPUT_STRIDE = N_FRAMES // 1500  # mel frames per timestamp step: 2
TIME_PRECISION_S = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp token
MIN_WINDOW_FRAMES = 10  # 0.1 s: a region's tail shorter than this holds no word; not decoded
# A window with under a second of audio (a file's last sliver) counts as silence on P(no speech)
# alone: there Whisper writes fluent, confident text into the padding (measured: a 0.38 s tail
# with P(no speech) 0.95 and log-probability -0.43 gave "I'm going to be able to do that" 8 times).
SHORT_WINDOW_FRAMES = 100
# A cut stretch decodes again from a hole of this many seconds between its words where at least
# LOUD_SHARE of the frames are loud (engine.rows.skipped_speech). Loud: above the middle of the
# file's 10th and 90th percentile frame levels (read2: speech 55-60 % of frames loud, the gaps
# between its clips 0-4 %).
HOLE_S = 2.0
LOUD_SHARE = 0.4
MIN_ADVANCE_S = 1.0


@dataclass
class FileState:
    """One submitted file, from submission to its Transcript."""

    key: object
    options: EngineOptions
    future: Future
    solo: bool = False  # decode it with no other file beside it (a suspect after a crash)
    mel: FileMel | None = None  # None: nothing to decode (empty, digital silence)
    audio_s: float = 0.0
    decoded_s: float | None = None
    warnings: tuple[str, ...] = ()
    language: str | None = None  # decoding language; None until detected
    language_probability: float | None = None
    open_rows: int = 0
    busy_s: float = 0.0  # its share of the device rounds it took part in
    frames_done: int = 0  # progress: frames its rows have moved past
    segments: list[tuple[Segment, str]] = field(default_factory=list)  # (kept segment, raw text)
    _loud_level: float | None = field(default=None, init=False, repr=False)  # is_loud's, once

    def is_loud(self, from_s: float, to_s: float) -> bool:
        """Whether LOUD_SHARE of the frames in [from_s, to_s) are loud for this file."""
        energy = self.mel.energy
        if self._loud_level is None:
            q10, q90 = np.percentile(energy, [10, 90])
            self._loud_level = float(q10 + 0.5 * (q90 - q10))
        frames = energy[int(from_s * FRAMES_PER_SECOND) : int(to_s * FRAMES_PER_SECOND)]
        return frames.size > 0 and float((frames > self._loud_level).mean()) >= LOUD_SHARE


@dataclass
class Row:
    """A stretch of one file, [start_frame, end_frame), decoded like a whole file: a batch row."""

    file: FileState
    start_frame: int
    end_frame: int
    seek: int
    prompt: list[int]  # tokens since the last prompt reset: the row's previous text
    last_speech_s: float = 0.0  # end of the last speech (words), as mlx_whisper tracks it
    # A cut stretch reads a few seconds of audio either side of its cuts (engine.session.split_row)
    # but keeps only the words whose middle lies in [keep[0], keep[1]) seconds; None: all of them.
    keep: tuple[float, float] | None = None

    @property
    def done(self) -> bool:
        """No audio left, or none it keeps: past keep[1] the next stretch has the words."""
        return self.seek >= self.stop or self.end_frame - self.seek < MIN_WINDOW_FRAMES

    @property
    def stop(self) -> int:
        """The frame where the audio it keeps ends (end_frame, or its cut where it reads past one)."""
        if self.keep is None or self.keep[1] == math.inf:
            return self.end_frame
        return min(self.end_frame, round(self.keep[1] * FRAMES_PER_SECOND))

    @property
    def remaining(self) -> int:
        return max(0, self.stop - self.seek)

    def crosses_keep(self, size: int) -> bool:
        """Whether its window of ``size`` frames holds audio outside what it keeps (trim needs words)."""
        if self.keep is None:
            return False
        start_s = self.seek / FRAMES_PER_SECOND
        return start_s < self.keep[0] or start_s + size / FRAMES_PER_SECOND > self.keep[1]


@dataclass
class Piece:
    """A segment of one window as mlx_whisper builds it (before its empty-text clearing)."""

    segment: Segment
    tokens: tuple[int, ...]
    raw: str
    token_span: tuple[float, float] | None = None  # (start, end) s by its timestamp tokens

    @property
    def span(self) -> tuple[float, float]:
        """Where its own timestamp tokens place it. Word timestamps (the segment once aligned) can
        lie far outside: a garbled window's words were aligned 24 s past its timestamps."""
        return self.token_span or (self.segment.start_s, self.segment.end_s)


def is_silence(r: WindowResult, o: EngineOptions, size: int) -> bool:
    """Whisper's no-speech rule: likely silence and not confidently decoded (plus the sliver rule)."""
    if o.no_speech_threshold is None or r.no_speech_prob <= o.no_speech_threshold:
        return False
    if size < SHORT_WINDOW_FRAMES:
        return True
    return not (o.logprob_threshold is not None and r.avg_logprob > o.logprob_threshold)


def needs_fallback(r: WindowResult, o: EngineOptions) -> bool:
    """Decode again, hotter: repetitive or unsure, unless it is silence (mlx_whisper's rule)."""
    if o.no_speech_threshold is not None and r.no_speech_prob > o.no_speech_threshold:
        return False
    too_repetitive = o.compression_ratio_threshold is not None and r.compression_ratio > o.compression_ratio_threshold
    too_unsure = o.logprob_threshold is not None and r.avg_logprob < o.logprob_threshold
    return too_repetitive or too_unsure


def window_pieces(row: Row, r: WindowResult, size: int, tokenizer, ts_begin: int) -> list[Piece]:
    """The window's segments from its timestamp pairs, absolute times (mlx_whisper's slicing)."""
    offset_s = row.seek * HOP_LENGTH / SAMPLE_RATE
    tokens = list(r.tokens)
    is_ts = [t >= ts_begin for t in tokens]
    single_ending = is_ts[-2:] == [False, True]
    consecutive = [i for i in range(1, len(tokens)) if is_ts[i - 1] and is_ts[i]]
    spans: list[tuple[float, float, list[int]]] = []
    if consecutive:
        last = 0
        for cut in consecutive + ([len(tokens)] if single_ending else []):
            piece = tokens[last:cut]
            spans.append(
                (offset_s + (piece[0] - ts_begin) * TIME_PRECISION_S, offset_s + (piece[-1] - ts_begin) * TIME_PRECISION_S, piece)
            )
            last = cut
    else:
        duration_s = size * HOP_LENGTH / SAMPLE_RATE
        stamps = [t for t in tokens if t >= ts_begin]
        if stamps and stamps[-1] != ts_begin:
            duration_s = (stamps[-1] - ts_begin) * TIME_PRECISION_S
        spans.append((offset_s, offset_s + duration_s, tokens))
    out = []
    for start_s, end_s, piece in spans:
        raw = tokenizer.decode([t for t in piece if t < tokenizer.eot])
        seg = Segment(
            start_s=start_s,
            end_s=end_s,
            text=raw,
            avg_logprob=r.avg_logprob,
            no_speech_prob=r.no_speech_prob,
            compression_ratio=r.compression_ratio,
            temperature=r.temperature,
        )
        out.append(Piece(seg, tuple(piece), raw, (start_s, end_s)))
    return out


def advance(row: Row, r: WindowResult, size: int, pieces: list[Piece], ts_begin: int, n_text_ctx: int, words: bool) -> None:
    """Seek and prompt after a window, as mlx_whisper does; keep the segments worth keeping."""
    o = row.file.options
    previous = row.seek
    if is_silence(r, o, size):
        row.seek += size
        row.file.frames_done += row.seek - previous
        return
    tokens = r.tokens
    single_ending = len(tokens) >= 2 and tokens[-1] >= ts_begin and tokens[-2] < ts_begin
    consecutive = [i for i in range(1, len(tokens)) if tokens[i - 1] >= ts_begin and tokens[i] >= ts_begin]
    if consecutive and not single_ending:
        # Whisper stopped at a timestamp, expecting the next window to start there: seek to it
        last_slice = consecutive[-1]
        row.seek += (tokens[last_slice - 1] - ts_begin) * INPUT_STRIDE
    else:
        row.seek += size
    time_offset_s = previous * HOP_LENGTH / SAMPLE_RATE
    if words:
        last_end = last_speech_end(pieces)
        if not single_ending and last_end is not None and last_end > time_offset_s:
            row.seek = round(last_end * FRAMES_PER_SECOND)
        if last_end is not None:
            row.last_speech_s = last_end
    if row.seek <= previous:  # never loop on one spot
        row.seek = previous + size
    keep, hole_s = row.keep, None
    if keep is not None:
        hole_s = skipped_speech(row, pieces, time_offset_s, min(row.seek, row.stop) / FRAMES_PER_SECOND)
        if hole_s is not None:  # decode again from where the speech was passed over
            row.seek = round(hole_s * FRAMES_PER_SECOND)
            keep = (keep[0], hole_s)
    row.file.frames_done += min(row.seek, row.end_frame) - previous

    audio_end_s = time_offset_s + size * HOP_LENGTH / SAMPLE_RATE  # past this the window is padding
    for p in pieces:
        seg = p.segment
        if seg.start_s == seg.end_s or not p.raw.strip():
            continue  # mlx_whisper clears such a segment: no text, no prompt tokens
        if hole_s is not None and p.span[0] >= hole_s:
            continue  # past the hole: decoded again in the next window
        row.prompt.extend(p.tokens)
        if not _kept(seg, p.raw, o, audio_end_s):
            continue
        end_s = min(seg.end_s, audio_end_s)
        kept = Segment(
            start_s=round(seg.start_s, 3),
            end_s=round(max(end_s, seg.start_s), 3),
            text=p.raw.strip(),
            avg_logprob=seg.avg_logprob,
            no_speech_prob=seg.no_speech_prob,
            compression_ratio=seg.compression_ratio,
            temperature=seg.temperature,
            words=seg.words,
        )
        raw = p.raw
        if keep is not None:
            trimmed = trim(kept, raw, keep, p.span)
            if trimmed is None:
                continue
            kept, raw = trimmed
        if kept.words and not o.word_timestamps:  # aligned only for trim
            kept = replace(kept, words=())
        row.file.segments.append((kept, raw))
    row.prompt = row.prompt[-(n_text_ctx // 2 - 1) :]  # all Whisper ever reads of it
    if not o.condition_on_previous_text or r.temperature > 0.5:
        row.prompt = []  # a hot fallback's text is no good as a prompt


def _kept(seg: Segment, raw: str, o: EngineOptions, audio_end_s: float) -> bool:
    """What goes into the transcript. Sequential Whisper keeps two kinds of invented text that
    this engine drops (both still count as previous text, so the decoding stays Whisper's):
    a segment that starts in a window's zero padding, past the audio (nothing is said there),
    and one segment repeating itself even after every fallback temperature (measured: base
    looped "Die Genehmigung, " for 1.6 s; a single sentence never compresses that well)."""
    if seg.start_s >= audio_end_s:
        return False
    threshold = o.compression_ratio_threshold
    return threshold is None or compression_ratio(raw) <= threshold


def trim(seg: Segment, raw: str, keep: tuple[float, float], span: tuple[float, float] | None = None) -> tuple[Segment, str] | None:
    """The part of a cut stretch's segment that is its own: the words whose middle lies in
    [keep[0], keep[1]), the rest belonging to the stretch either side (None: nothing left). A
    word's middle is taken inside the segment's ``span`` (its timestamp tokens' times), so that
    a word aligned far from where its segment was decoded is not kept twice. A segment without
    words goes by its own middle."""
    lo, hi = keep
    if not seg.words:
        return (seg, raw) if lo <= (seg.start_s + seg.end_s) / 2 < hi else None
    mine = [w for w in seg.words if lo <= _middle(w, span) < hi]
    if len(mine) == len(seg.words):
        return seg, raw
    if not mine:
        return None
    raw = "".join(w.word for w in mine)
    start_s, end_s = round(mine[0].start_s, 3), round(mine[-1].end_s, 3)
    return replace(seg, start_s=start_s, end_s=max(end_s, start_s), text=raw.strip(), words=tuple(mine)), raw


def _middle(w, span: tuple[float, float] | None) -> float:
    middle = (w.start_s + w.end_s) / 2
    return middle if span is None else min(max(middle, span[0]), span[1])


def skipped_speech(row: Row, pieces: list[Piece], window_s: float, until_s: float) -> float | None:
    """Where a cut stretch's window passed over speech it keeps: the start of the first stretch of
    HOLE_S or more between its words (segments, where it has none) that is mostly loud, in
    [keep[0], until_s); None where there is none. Only a hole at least MIN_ADVANCE_S past the
    window's start counts, so the window decoded again from there always moves on.

    Whisper sometimes jumps its timestamps over a whole utterance, or ends a window early (measured:
    a stretch of the read2 file starting 0.3 s before a clip lost the next 12 s clip, its words
    aligned past it; sequential mlx_whisper started there loses it too). Sequential Whisper keeps
    such a loss; a cut stretch, already not sequential Whisper's decoding, decodes the hole again."""
    lo, hi = max(window_s, row.keep[0]), min(until_s, row.keep[1])
    # what the window decoded: each word as a point (its middle, as trim counts it), else segments
    spans = sorted((m, m) for p in pieces for m in (_middle(w, p.span) for w in p.segment.words))
    if not spans:
        spans = sorted((p.segment.start_s, p.segment.end_s) for p in pieces if p.raw.strip())
    cursor = lo
    for start_s, end_s in spans + [(hi, hi)]:
        gap_end = min(start_s, hi)
        if gap_end - cursor >= HOLE_S and cursor >= window_s + MIN_ADVANCE_S and row.file.is_loud(cursor, gap_end):
            return cursor
        cursor = max(cursor, end_s)
        if cursor >= hi:
            return None
    return None


def last_speech_end(pieces: list[Piece]) -> float | None:
    """mlx_whisper's ``_get_end``: the last word's end, else the last segment's end."""
    for p in reversed(pieces):
        if p.segment.words:
            return p.segment.words[-1].end_s
    return pieces[-1].segment.end_s if pieces else None
