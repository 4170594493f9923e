"""Audio in, Transcript records out: the single-mel batched engine.

Each file's log-mel is computed once and cut at quiet points into regions (engine.windows). Every
region is decoded as sequential Whisper decodes a file: a 30 s window from its seek point, the
region's previous text as the prompt, fallback to hotter temperatures when the output looks
wrong, then seek to the last timestamp (or past the window). The regions of all files given
advance together, one batch row each: each round encodes and decodes one window per row, and a
row whose region is done is refilled from the queue. So a batch holds windows of one long file
or of many short ones alike, and device memory is bounded by the batch (the mel stays on the host).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
from mlx_whisper.decoding import compression_ratio
from mlx_whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram

from archive_asr.records import Segment, Timing, Transcript
from engine import holder
from engine.decode import TokenRules, WindowResult, decode_batch
from engine.encode import encode
from engine.errors import AudioDecodeError
from engine.options import EngineOptions
from engine.windows import MIN_WINDOW_FRAMES, Region, frame_energy, plan_regions, window_mel

log = logging.getLogger(__name__)

INPUT_STRIDE = N_FRAMES // 1500  # mel frames per timestamp step: 2
TIME_PRECISION_S = INPUT_STRIDE * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp token
# Digital silence is flat at the log-mel clamp floor: a window whose frames all have (almost) no
# spread across mel bands and the same level holds nothing to decode. (Not a level threshold: the
# clamp is per 30 s block in engine.mel, so quiet speech may sit below a loud block's floor.)
FLAT = 1e-3
SHORT_WINDOW_FRAMES = 100  # 1 s: see _is_silence
CPU_REGION_S = 30.0  # the encoder dominates on a CPU: fewer, fuller windows (EngineOptions.region_s)
GPU_REGION_S = 12.0  # decoding rounds dominate on a GPU: more rows, fewer rounds
MIN_SAMPLES = 160  # shorter audio (< 10 ms, one mel frame) holds nothing to transcribe


def clear_cache() -> None:
    """Return MLX's cached buffers to the system: workers call this between jobs."""
    holder.clear_cache()


def transcribe_audio(audio: np.ndarray, *, model_name: str | None = None, options: EngineOptions = EngineOptions()) -> Transcript:
    """Transcribe one float32 16 kHz mono signal."""
    return transcribe_many([audio], model_name=model_name, options=options)[0]


def transcribe_file(path: str | Path, *, model_name: str | None = None, options: EngineOptions = EngineOptions()) -> Transcript:
    """Decode a file (any container engine.audio reads) and transcribe it.

    Raises engine.errors.AudioDecodeError for undecodable input.
    """
    return transcribe_many([path], model_name=model_name, options=options)[0]


def transcribe_many(
    audios_or_paths: Sequence[np.ndarray | str | Path],
    *,
    model_name: str | None = None,
    options: EngineOptions = EngineOptions(),
    return_exceptions: bool = False,
    languages: Sequence[str | None] | None = None,
) -> list:
    """Transcribe several files together: windows of all of them share batches.

    Returns one Transcript per input, in order. A path that cannot be decoded raises
    AudioDecodeError, or, with return_exceptions=True, puts that error in its place while the other
    files are transcribed (the worker records it on that file's job alone). Each Transcript's
    Timing.wall_s is its share (by duration) of the whole call's wall time. ``languages``: per
    input, a forced decoding language (None: options.language, or detect), e.g. from packing.
    """
    loaded = holder.get_model(model_name)
    if options.language and not loaded.is_multilingual and options.language.lower() != "en":
        raise ValueError(f"model {loaded.name} is English-only; it cannot transcribe language {options.language!r}")
    from engine import packing  # issue 4: short inputs share windows (engine/packing.py)

    if len(audios_or_paths) > 1 and not packing.active():
        return packing.transcribe_packed(
            audios_or_paths, model_name=model_name, options=options, return_exceptions=return_exceptions
        )
    batch_size = _batch_size(loaded, options)
    started = time.perf_counter()
    outcomes: list = []
    files: list[_File] = []
    for index, item in enumerate(audios_or_paths):
        f = _File(index=len(files), audio_s=0.0)
        try:
            if isinstance(item, (str, Path)):
                _prepare_path(f, item, loaded, options)
            else:
                audio = load_input(item)
                f.audio_s = len(audio) / SAMPLE_RATE
                _prepare(f, audio, loaded, options)
        except AudioDecodeError as e:
            if not return_exceptions:
                raise
            outcomes.append(e)
            continue
        if languages is not None and languages[index] and loaded.is_multilingual:
            f.language = f.reported_language = languages[index].lower()
        files.append(f)
        outcomes.append(f)
    _Engine(loaded, options, batch_size).run(files)
    wall_s = time.perf_counter() - started
    total_s = sum(f.audio_s for f in files) or 1.0
    device = holder.device_name()
    return [
        o if isinstance(o, Exception) else _transcript(o, loaded, options, batch_size, device, wall_s * (o.audio_s / total_s or 1.0 / len(files)))
        for o in outcomes
    ]


# ---------------------------------------------------------------------------------------------


@dataclass
class _File:
    """One input's state while its regions are decoded."""

    index: int
    audio_s: float
    mel: np.ndarray | None = None  # (n_frames, n_mels) float32 log-mel, in host memory or memory-mapped
    mel_store: object | None = None  # the temporary file behind a memory-mapped mel
    energy: np.ndarray | None = None  # (n_frames,) mean log-mel per frame
    spread: np.ndarray | None = None  # (n_frames,) max - min over the mel bands of each frame
    language: str | None = None  # decoding language (None: not decided yet)
    reported_language: str | None = None
    language_probability: float | None = None
    language_windows: list = field(default_factory=list)  # WindowLanguage seen so far (undecided only)
    segments: list[tuple[float, Segment, str]] = field(default_factory=list)  # (start, segment, raw text)


@dataclass
class _Stream:
    """One region being decoded like a file of its own: a batch row."""

    file: _File
    region: Region
    seek: int
    prompt: list[int]  # tokens since the last prompt reset (the region's previous text)
    last_speech_s: float | None = None

    @property
    def done(self) -> bool:
        return self.region.end_frame - self.seek < MIN_WINDOW_FRAMES


def load_input(item) -> np.ndarray:
    """A path decoded to 16 kHz mono float32, or an array checked to be mono float32."""
    if isinstance(item, (str, Path)):
        from engine.audio import load_audio

        return load_audio(item)
    audio = np.asarray(item, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (n_samples,), got shape {audio.shape}")
    return audio


def _prepare(f: _File, audio: np.ndarray, loaded, options: EngineOptions) -> None:
    """The file's log-mel (once), its per-frame energy, and its forced language."""
    n_frames = len(audio) // HOP_LENGTH
    if len(audio) < MIN_SAMPLES or not np.any(audio):
        f.mel = None  # nothing to transcribe (empty, or digital silence)
    else:
        mel = _log_mel(audio, loaded.dims.n_mels)[:n_frames]
        f.energy = frame_energy(mel)
        f.spread = np.array(mx.max(mel, axis=1) - mx.min(mel, axis=1))
        # kept in host memory: on a GPU only the windows in flight take device memory, so the
        # device's peak does not grow with the file's length (a 3 h mel is 345 MB)
        f.mel = np.array(mel)
    _set_language(f, loaded, options)


def _prepare_path(f: _File, path: str | Path, loaded, options: EngineOptions) -> None:
    """Stream a file from disk: decoded 30 s at a time, its log-mel written block by block to an
    anonymous temporary file and memory-mapped, so neither the signal nor the mel of a 6-hour
    recording is held in memory (only its per-frame energy: 4 bytes a frame). The blocks are
    those of engine.mel.log_mel, so the result equals decoding the whole file first.
    """
    from engine.audio import iter_audio
    from engine.mel import iter_log_mel

    seen = {"samples": 0, "sound": False}

    def chunks():
        for chunk in iter_audio(path, chunk_s=30.0):
            seen["samples"] += len(chunk)
            seen["sound"] = seen["sound"] or bool(np.any(chunk))
            yield chunk

    n_mels = loaded.dims.n_mels
    store = tempfile.TemporaryFile(prefix="archive-asr-mel-")
    energy, spread, stored_frames = [], [], 0
    for block in iter_log_mel(chunks(), n_mels):  # (n, n_mels), n <= 3000
        energy.append(frame_energy(block))
        spread.append(np.array(mx.max(block, axis=1) - mx.min(block, axis=1)))
        store.write(np.asarray(block, dtype=np.float32).tobytes())
        stored_frames += block.shape[0]
    f.audio_s = seen["samples"] / SAMPLE_RATE
    n_frames = min(seen["samples"] // HOP_LENGTH, stored_frames)
    if seen["samples"] < MIN_SAMPLES or not seen["sound"] or n_frames == 0:
        f.mel = None  # nothing to transcribe (empty, or digital silence)
        store.close()
    else:
        store.flush()
        f.mel = np.memmap(store, dtype=np.float32, mode="r", shape=(stored_frames, n_mels))[:n_frames]
        f.mel_store = store  # the open file keeps the mapping's data; closed with the _File
        f.energy = np.concatenate(energy)[:n_frames]
        f.spread = np.concatenate(spread)[:n_frames]
    _set_language(f, loaded, options)


def _set_language(f: _File, loaded, options: EngineOptions) -> None:
    if not loaded.is_multilingual:
        f.language = "en"
    elif options.language:
        f.language = options.language.lower()
    f.reported_language = f.language


def _log_mel(audio: np.ndarray, n_mels: int) -> mx.array:
    """(n_frames, n_mels) log-mel, from engine.mel when present (bounded memory), else mlx_whisper's."""
    try:
        from engine.mel import log_mel
    except ImportError:
        # as mlx_whisper.transcribe: 30 s of zeros appended, so the STFT of any length is defined
        return log_mel_spectrogram(audio, n_mels=n_mels, padding=N_SAMPLES)
    return log_mel(audio, n_mels=n_mels)


def _batch_size(loaded, options: EngineOptions) -> int:
    from engine.memory import log_plan, plan_batch

    plan = plan_batch(loaded.dims, loaded.dtype, batch_size=options.batch_size, word_timestamps=options.word_timestamps)
    log_plan(plan)
    return plan.batch_size


@dataclass
class RunStats:
    """Where one call's time went (logged at INFO; the benchmark prints it)."""

    regions: int = 0
    rounds: int = 0
    windows: int = 0  # windows encoded
    redecoded: int = 0  # windows decoded again at a higher temperature
    encode_s: float = 0.0
    decode_s: float = 0.0
    words_s: float = 0.0


last_stats = RunStats()  # of the latest call in this process, for benchmarks


class _Engine:
    """Rounds of batched encode + decode over the regions of all files."""

    def __init__(self, loaded, options: EngineOptions, batch_size: int):
        self.loaded = loaded
        self.model = loaded.model
        self.options = options
        self.batch_size = batch_size
        self.dtype = loaded.dtype
        base = loaded.tokenizer(language=None if not loaded.is_multilingual else "en", task=options.task)
        self.rules = TokenRules(base, loaded.dims.n_vocab, options)
        self.initial_prompt = base.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else []
        self.stats = RunStats()
        self.region_s = options.region_s or (GPU_REGION_S if mx.default_device().type == mx.gpu else CPU_REGION_S)
        self.words = None
        if options.word_timestamps:
            try:
                from engine import words
            except ImportError:
                log.warning("engine.words is missing: transcribing without word timestamps")
            else:
                self.words = words

    def tokenizer(self, language: str):
        return self.loaded.tokenizer(language=language, task=self.options.task)

    def run(self, files: list[_File]) -> None:
        global last_stats
        pending = deque(self._regions(files))
        self.stats = last_stats = RunStats(regions=len(pending))
        active: list[_Stream] = []
        while pending or active:
            while len(active) < self.batch_size and pending:
                region = pending.popleft()
                active.append(_Stream(files[region.file_index], region, region.start_frame, list(self.initial_prompt)))
            self._round(active)
            active = [s for s in active if not s.done]
        log.info("engine run: %s", self.stats)

    def _regions(self, files: list[_File]) -> list[Region]:
        """Cut every file into regions, in file order then time order."""
        regions = []
        for f in files:
            if f.mel is not None:
                regions += plan_regions(
                    f.energy, file_index=f.index, region_s=self.region_s, search_s=self.options.cut_search_s
                )
        return regions

    def _round(self, streams: list[_Stream]) -> None:
        """Encode and decode one window of every stream; advance each."""
        live, mels, sizes = [], [], []
        for s in streams:
            mel, size = window_mel(s.file.mel, s.seek, s.region.end_frame)
            energy = s.file.energy[s.seek : s.seek + size]
            if s.file.spread[s.seek : s.seek + size].max() < FLAT and energy.max() - energy.min() < FLAT:
                s.seek += size  # digital silence: nothing to decode
                continue
            live.append(s)
            mels.append(mel)
            sizes.append(size)
        if not live:
            return
        t0 = time.perf_counter()
        features = encode(self.model, mx.stack(mels).astype(self.dtype))  # (n, n_audio_ctx, n_audio_state)
        mx.eval(features)
        t1 = time.perf_counter()
        languages = self._languages(live, features)
        results = self._decode_with_fallback(live, features, languages)
        window_segments = [self._segments(s, r, size, lang) for s, r, size, lang in zip(live, results, sizes, languages)]
        t2 = time.perf_counter()
        if self.words is not None:
            window_segments = self._add_words(live, features, sizes, window_segments, languages)
        st = self.stats
        st.rounds += 1
        st.windows += len(live)
        st.encode_s += t1 - t0
        st.decode_s += t2 - t1
        st.words_s += time.perf_counter() - t2
        for s, r, size, segs in zip(live, results, sizes, window_segments):
            self._advance(s, r, size, segs)

    def _languages(self, streams: list[_Stream], features: mx.array) -> list[str]:
        """Decoding language per row. A file whose language is open gets it from its first windows
        with speech (engine.language: one decoder step on SOT per window); until one has speech its
        windows decode in the likeliest language so far (they are mostly skipped as silence)."""
        open_rows = [i for i, s in enumerate(streams) if s.file.language is None]
        if open_rows:
            from engine.language import pick_language, window_languages

            threshold = self.options.no_speech_threshold or 0.6
            found = window_languages(self.loaded, features[mx.array(open_rows)])
            for i, w in sorted(zip(open_rows, found), key=lambda x: streams[x[0]].seek):
                streams[i].file.language_windows.append(w)
            for f in {streams[i].file.index: streams[i].file for i in open_rows}.values():
                speech = [w for w in f.language_windows if w.no_speech_prob < threshold]
                if speech:
                    f.reported_language, f.language_probability = pick_language(
                        f.language_windows, is_multilingual=True, no_speech_threshold=threshold
                    )
                    f.language = _likeliest(speech)
        return [s.file.language or _likeliest(s.file.language_windows) for s in streams]

    def _decode_with_fallback(self, streams: list[_Stream], features: mx.array, languages: list[str]) -> list[WindowResult]:
        """Decode all rows at the first temperature; rows that fail the thresholds again, hotter, together."""
        o = self.options
        tokenizers = [self.tokenizer(lang) for lang in languages]
        prompts = [s.prompt for s in streams]
        results: list[WindowResult | None] = [None] * len(streams)
        todo = list(range(len(streams)))
        for n, temperature in enumerate(o.temperatures):
            rows = mx.array(todo)
            decoded = decode_batch(
                self.model,
                [tokenizers[i] for i in todo],
                features[rows] if len(todo) < len(streams) else features,
                [prompts[i] for i in todo],
                temperature=temperature,
                options=o,
                rules=self.rules,
            )
            again = []
            for i, r in zip(todo, decoded):
                results[i] = r
                if n + 1 < len(o.temperatures) and _needs_fallback(r, o):
                    again.append(i)
            todo = again
            self.stats.redecoded += len(todo)
            if not todo:
                break
        return results  # type: ignore[return-value]

    def _segments(self, s: _Stream, r: WindowResult, size: int, language: str) -> list[tuple[Segment, tuple[int, ...], str]]:
        """Whisper's segments from one window's tokens (timestamp pairs), absolute times."""
        o = self.options
        if _is_silence(r, o, size):
            return []
        tok = self.tokenizer(language)
        ts_begin = tok.timestamp_begin
        offset_s = s.seek * HOP_LENGTH / SAMPLE_RATE
        tokens = list(r.tokens)
        is_ts = [t >= ts_begin for t in tokens]
        single_ending = is_ts[-2:] == [False, True]
        consecutive = [i for i in range(1, len(tokens)) if is_ts[i - 1] and is_ts[i]]
        pieces: list[tuple[float, float, list[int]]] = []
        if consecutive:
            cuts = consecutive + ([len(tokens)] if single_ending else [])
            last = 0
            for cut in cuts:
                piece = tokens[last:cut]
                pieces.append(
                    (offset_s + (piece[0] - ts_begin) * TIME_PRECISION_S, offset_s + (piece[-1] - ts_begin) * TIME_PRECISION_S, piece)
                )
                last = cut
        else:
            duration_s = size * HOP_LENGTH / SAMPLE_RATE
            stamps = [t for t in tokens if t >= ts_begin]
            if stamps and stamps[-1] != ts_begin:
                duration_s = (stamps[-1] - ts_begin) * TIME_PRECISION_S
            pieces.append((offset_s, offset_s + duration_s, tokens))
        out = []
        audio_end_s = offset_s + size * HOP_LENGTH / SAMPLE_RATE  # past this the window is padding
        for start_s, end_s, piece in pieces:
            raw = tok.decode([t for t in piece if t < tok.eot])
            if start_s >= audio_end_s:
                continue  # nothing is said in the zero padding: text there is invented
            end_s = min(end_s, audio_end_s)
            if start_s >= end_s or not raw.strip():
                continue
            if o.compression_ratio_threshold is not None and compression_ratio(raw) > o.compression_ratio_threshold:
                # One segment repeating itself even after every fallback temperature (measured:
                # base looped "Die Genehmigung, " for 1.6 s at a region's end): a loop, not speech.
                # A single sentence never compresses that well; Whisper applies the same bar to
                # the whole window's text.
                continue
            seg = Segment(
                start_s=round(start_s, 3),
                end_s=round(end_s, 3),
                text=raw.strip(),
                avg_logprob=r.avg_logprob,
                no_speech_prob=r.no_speech_prob,
                compression_ratio=r.compression_ratio,
                temperature=r.temperature,
            )
            out.append((seg, tuple(piece), raw))
        return out

    def _add_words(self, streams, features, sizes, window_segments, languages):
        """Word timestamps for the whole round at once, from the encoder output already computed."""
        windows, rows = [], []
        for i, (s, size, segs, language) in enumerate(zip(streams, sizes, window_segments, languages)):
            if not segs:
                continue
            rows.append(i)
            windows.append(
                self.words.WindowTokens(
                    feature_index=i,
                    offset_s=s.seek * HOP_LENGTH / SAMPLE_RATE,
                    num_frames=size,
                    segments=tuple(seg for seg, _, _ in segs),
                    tokens=tuple(t for _, t, _ in segs),
                    language=language,
                    last_speech_s=s.last_speech_s,
                )
            )
        if not windows:
            return window_segments
        timed = self.words.add_word_timestamps(self.loaded, features, windows)
        out = list(window_segments)
        for i, new in zip(rows, timed):
            out[i] = [(seg, t, raw) for seg, (_, t, raw) in zip(new, window_segments[i])]
        return out

    def _advance(self, s: _Stream, r: WindowResult, size: int, segs) -> None:
        """Keep the window's segments; seek as sequential Whisper does."""
        o = self.options
        if _is_silence(r, o, size):
            s.seek += size
            return
        ts_begin = self.rules.ts_begin
        tokens = r.tokens
        single_ending = len(tokens) >= 2 and tokens[-1] >= ts_begin and tokens[-2] < ts_begin
        consecutive = [i for i in range(1, len(tokens)) if tokens[i - 1] >= ts_begin and tokens[i] >= ts_begin]
        previous = s.seek
        if consecutive and not single_ending:
            # Whisper stopped at a timestamp, expecting the next window to start there: seek to it
            s.seek += (tokens[consecutive[-1] - 1] - ts_begin) * INPUT_STRIDE
        else:
            s.seek += size
        if s.seek <= previous:  # never loop on one spot
            s.seek = previous + size
        for seg, piece, raw in segs:
            s.file.segments.append((seg.start_s, seg, raw))
            s.prompt.extend(piece)
        s.prompt = s.prompt[-(self.model.dims.n_text_ctx // 2 - 1) :]  # all Whisper ever reads of it
        if segs:
            s.last_speech_s = segs[-1][0].end_s
        if not o.condition_on_previous_text or r.temperature > 0.5:
            s.prompt = []  # a hot fallback's text is no good as a prompt


def _likeliest(windows) -> str:
    """The language with the highest mean probability over these windows."""
    codes = list(windows[0].language_probs)
    mean = np.mean([[w.language_probs[c] for c in codes] for w in windows], axis=0)
    return codes[int(np.argmax(mean))]


def _needs_fallback(r: WindowResult, o: EngineOptions) -> bool:
    if o.no_speech_threshold is not None and r.no_speech_prob > o.no_speech_threshold:
        return False  # silence: no point decoding it hotter
    too_repetitive = o.compression_ratio_threshold is not None and r.compression_ratio > o.compression_ratio_threshold
    too_unsure = o.logprob_threshold is not None and r.avg_logprob < o.logprob_threshold
    return too_repetitive or too_unsure


def _is_silence(r: WindowResult, o: EngineOptions, size: int) -> bool:
    """Whisper's no-speech rule: likely silence and not confidently decoded. A window with under
    a second of audio (a region's last sliver) counts as silence on P(no speech) alone: there
    Whisper writes fluent, confident text into the padding (measured: a 0.38 s tail with
    P(no speech) 0.95 and log-probability -0.43 gave "I'm going to be able to do that" eight times)."""
    if o.no_speech_threshold is None or r.no_speech_prob <= o.no_speech_threshold:
        return False
    if size < SHORT_WINDOW_FRAMES:
        return True
    return not (o.logprob_threshold is not None and r.avg_logprob > o.logprob_threshold)


def _transcript(f: _File, loaded, options: EngineOptions, batch_size: int, device: str, wall_s: float) -> Transcript:
    entries = sorted(f.segments, key=lambda e: e[0])
    segments = tuple(seg for _, seg, _ in entries)
    if segments and options.word_timestamps:
        try:
            from engine.words import finalize_words
        except ImportError:
            pass
        else:
            segments = tuple(finalize_words(segments))
    text = "".join(raw for _, _, raw in entries).strip()
    language, probability = f.reported_language, f.language_probability
    if not segments and not options.language:
        language, probability = None, None  # no speech: no language
    return Transcript(
        language=language,
        language_probability=probability,
        duration_s=f.audio_s,
        text=text,
        segments=segments,
        timing=Timing(audio_s=f.audio_s, wall_s=wall_s, batch_size=batch_size, device=device, model=loaded.name),
        options=options.as_record(),
    )
