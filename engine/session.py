"""The engine session: one per process, it owns the model and the batch rows.

Files are submitted at any time (a path or an array, its options, a key) and each comes back as
its own Future: a Transcript, or that file's own error. Behind ``submit`` a small thread pool
decodes the audio and computes the file's log-mel (engine.mel) while the device works. ``step``
advances every row by one window (one batched encode, one batched greedy decode with fallback,
words for the rows that want them) and resolves the files that finished; a freed row is refilled
at once from the files waiting.

A row is a whole file, decoded as sequential Whisper decodes it (engine.rows), so in an archive the
batch is many files side by side and each transcript is sequential Whisper's. Only when rows would
otherwise idle (a lone long file, the tail of a queue) is a running file cut, at its quietest
point, into stretches of at least ``min_region_s`` that fill them (``split_row``).

mlx-lm's BatchGenerator and vLLM's LLMEngine are the model: callers only submit and collect.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import engine  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
from mlx_whisper.audio import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, SAMPLE_RATE

from archive_asr.records import Timing, Transcript
from engine import blas, holder, words
from engine.decode import TokenRules, WindowResult, decode_batch
from engine.decoders import DecoderPool
from engine.encode import encode
from engine.errors import BatchFailed, UnsupportedLanguage
from engine.language import window_languages
from engine.memory import backend as memory_backend
from engine.memory import bound_allocator, log_plan, plan_batch
from engine.options import EngineOptions
from engine.prepare import prepare
from engine.rows import FileState, Piece, Row, advance, is_silence, needs_fallback, window_pieces

log = logging.getLogger(__name__)

# A file is cut to fill idle rows only into stretches at least this long (seconds); None: never.
# Each cut starts a stretch with no previous text, the one place where a batch differs from
# sequential Whisper, and where the cut falls moves WER by about a point on one file. Measured
# (H100, base float16, each English long file alone, README "A lone long file"): stretches that
# ended at their cuts lost 0.9 to 2.9 points on read2 at every length of 15 to 22 s (30 s: +1.95,
# 45 s: +0.08, 180 s: +0.08, words on +0.34). Reading past the cuts (LEAD_S, 2026-12-07) kept
# both files within +0.3 at 15 s, but read2 lost 4-5 points at 16.7 and 25 s (Whisper passing over
# a clip; decoded again since, engine.rows.skipped_speech) and 1.1-1.6 at 16.7-25 s after that
# (CPU). No length can be safe: sequential Whisper itself, started 40-260 s into either file with
# no previous text, moved the file's WER by -0.59 to +3.36 points from that one start
# (benchmarks/late_start.py), and a file cut to fill the rows has 20-30 starts. So by default a
# file is never cut and every transcript is sequential Whisper's. ARCHIVE_ASR_MIN_REGION_S turns
# cutting on.
MIN_REGION_S: float | None = None
QUIET_SPAN_FRAMES = 30  # 0.3 s: a cut point's quietness is the mean level around it
CUT_SEARCH_S = 5.0  # a cut is searched this far either side of the middle of what remains
CUT_SLACK = 1.2  # stretches planned 20 % over the minimum, so each cut has room to find a quiet point
# A cut stretch reads on this far past each of its cuts, to the quietest point between (seconds):
# its words at the cut are decoded inside its window, not at the window's edge. Chunks of 20 s
# read 3-8 s past gave read2 -0.26 against sequential where ending at the cuts gave +1.02 (CPU,
# base float32, words on); a fixed 3 s began chunks mid-word, and one lost 28 s.
LEAD_S = (3.0, 8.0)
SPLIT_GRACE_S = 0.5  # a worker's next files may be on their way: wait this long before cutting one
# Preparing threads at most (each with its child decoder, engine.decoders). At a worker's start a
# whole batch of files arrives at once and the rows fill only as fast as they are prepared: on an
# H200 a file took ~0.44 s of a thread (decoding and mel, summed over a 24.6 h run), so 8 threads
# needed ~9 s for 160 files while the device ran part-empty rounds. With 16, `archive-asr run`
# kept the engine's pace over its jobs (1368.3x against the engine alone's 1368.5x, 8.9 h).
MAX_PREPARE_THREADS = 16
# Starting from idle with fewer than half the rows' files ready and others still being prepared,
# the first round waits this long at most for them: at a worker's start a batch of files arrives
# at once, and without the wait its first rounds ran 1, then 45, then 95 of 128 rows (H200,
# `archive-asr run`), each as long as a full round; on a CPU, where a round takes seconds, three
# clips took two rounds instead of one. Rows already running never wait for newcomers.
FILL_WAIT_S = 0.25
# A round is logged with its parts when it takes over SLOW_ROUND_S and STALL_FACTOR times the median of
# the rounds before it (a full 64-row round on an H200: ~1 s; a process's first fallback took 24 s).
SLOW_ROUND_S = 5.0
STALL_FACTOR = 4
WARM_UP_TOKENS = 4  # steps each warm-up decode runs: enough for the first step's variant and the rest
MAX_TRACE = 2_000  # rounds whose live rows RoundStats keeps (a long-running worker: its first ones)


@dataclass
class RoundStats:
    """Where the session's time went (the benchmarks print it)."""

    rounds: int = 0
    windows: int = 0  # windows encoded
    redecoded: int = 0  # windows decoded again at a higher temperature
    splits: int = 0  # rows cut to fill idle ones
    encode_s: float = 0.0
    decode_s: float = 0.0
    words_s: float = 0.0
    idle_rows: int = 0  # sum over rounds of rows left empty
    starved_rows: int = 0  # of those, rows left empty while files were still being prepared (the feed lagged)
    live_rows: list[int] = field(default_factory=list)  # rows run in each round (the first MAX_TRACE): ramp and tail
    # each traced round's start (ms after the session's first round) and its length on the device (ms):
    # the gaps between rounds are the driver's own time and its waits, the tail shows where rows ran dry
    round_start_ms: list[int] = field(default_factory=list)
    round_ms: list[int] = field(default_factory=list)
    # of each traced round's length, its encode and its word timings (ms; the rest is decoding):
    # where a slow first round of a process goes
    round_encode_ms: list[int] = field(default_factory=list)
    round_words_ms: list[int] = field(default_factory=list)
    files: int = 0  # files prepared
    audio_s: float = 0.0  # their audio
    prepare_decode_s: float = 0.0  # decoding containers, summed over the preparing threads
    prepare_mel_s: float = 0.0  # log-mel, summed over the preparing threads
    idle_s: float = 0.0  # the driver waiting with no row to run
    read_s: float = 0.0  # reading and normalising each round's windows, before its encode (part of the gaps between rounds)

    @property
    def device_s(self) -> float:
        return self.encode_s + self.decode_s + self.words_s


class RoundInput:
    """A round's windows, (rows, N_FRAMES, n_mels) float32, in one buffer reused round after round.

    The driver thread fills it between the device's rounds, so its cost is the card's idle time:
    64 new windows stacked into one array cost a copy of 61 MB and fresh pages every round
    (benchmarks/bench_round_input.py)."""

    def __init__(self, n_mels: int, rows: int = 1):
        self._buf = np.empty((rows, N_FRAMES, n_mels), np.float32)

    def row(self, i: int) -> np.ndarray:
        """Row i's (N_FRAMES, n_mels) slot, growing the buffer (keeping what is written) if needed."""
        if i >= len(self._buf):
            grown = np.empty((max(i + 1, 2 * len(self._buf)), *self._buf.shape[1:]), np.float32)
            grown[: len(self._buf)] = self._buf
            self._buf = grown
        return self._buf[i]

    def to_mlx(self, n: int) -> mx.array:
        """The first n rows as an MLX array (a copy: the buffer is written again next round)."""
        return mx.array(self._buf[:n])


class Session:
    """One model, its batch rows, and the files waiting for them."""

    def __init__(
        self,
        model_name: str | None = None,
        *,
        batch_size: int = 0,
        options: EngineOptions = EngineOptions(),
        min_region_s: float | None = MIN_REGION_S,
        prepare_threads: int = 0,
    ):
        blas.single_threaded_numpy_blas()  # the mel's matrix product runs in many threads (engine.blas says why)
        self.loaded = holder.get_model(model_name)
        self.model = self.loaded.model
        self.options = options  # batch-wide settings: sample_len, check_every, suppress_tokens
        plan = plan_batch(
            self.loaded.dims, self.loaded.dtype, batch_size=batch_size or options.batch_size, word_timestamps=True,
            quantization=self.loaded.quantization,
        )
        log_plan(plan)
        bound_allocator(plan)
        self.batch_size = plan.batch_size
        self.min_region_frames = int(min_region_s * FRAMES_PER_SECOND) if min_region_s else None
        base = self.loaded.tokenizer(language=None if not self.loaded.is_multilingual else "en")
        self.rules = TokenRules(base, self.loaded.dims.n_vocab, options)
        self.device = holder.device_name()
        self.stats = RoundStats()
        self._first_round_at: float | None = None  # perf_counter() at the first round's encode
        self._input = RoundInput(self.loaded.dims.n_mels, self.batch_size)
        # Decoding containers and the log-mel run beside the device: on a GPU they must keep up with
        # it (an H100 transcribes ~1,000 s of audio a second), so use most cores, leaving one.
        threads = prepare_threads or max(2, min(MAX_PREPARE_THREADS, (os.cpu_count() or 2) - 1))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="prepare")
        # each preparing thread decodes containers in a child process (engine.decoders says why)
        self._decoders = DecoderPool()
        self._cond = threading.Condition()
        self._waiting: deque[FileState] = deque()  # prepared, waiting for a row
        self._preparing = 0  # submitted, not yet prepared
        self._last_submit = 0.0
        self._rows: list[Row] = []
        self._step_lock = threading.Lock()
        self.split_grace_s = 0.0

    def warm_up(self) -> float:
        """Run the decoding step once per kernel variant (and compile the word timings' DTW) before
        the first file, so that MLX compiles them now rather than in the middle of a full round:
        its fused kernels differ for one row and for several, and for greedy decoding and
        temperature fallback's sampling. On a GPU the first fallback of a fresh process stalled a
        64-row round for 16-24 s (H200, base; the one-row variant 7.7 s), every row waiting and the
        jobs' leases running down. Compiled kernels are cached on disk: on a fresh H200 this took
        92-102 s, in later processes there 1.0-1.5 s, on a 2-core CPU 0.6 s; with MLX's kernel
        cache unpacked first (benchmarks/gpu/mlx-ptx-cache.tgz) a fresh H200 took 2.9-3.6 s.
        Returns the seconds it took."""
        t0 = time.perf_counter()
        dims = self.loaded.dims  # the encoder is not compiled: random features stand in for its output
        features = (0.1 * mx.random.normal((2, dims.n_audio_ctx, dims.n_audio_state), key=mx.random.key(0))).astype(self.loaded.dtype)
        tokenizer = self.loaded.tokenizer(None if not self.loaded.is_multilingual else "en")
        options = replace(self.options, sample_len=WARM_UP_TOKENS)
        hotter = next((t for t in self.options.temperatures if t > 0), 0.2)
        for rows in (1, 2):
            for temperature in (0.0, hotter):
                decode_batch(self.model, [tokenizer] * rows, features[:rows], [[]] * rows,
                             temperature=temperature, options=options, rules=self.rules)
        words.warm_up()
        took = time.perf_counter() - t0
        log.info("decoding kernels and word timings ready in %.1f s", took)
        return took

    # --- submitting and collecting ------------------------------------------------------------

    def submit(
        self,
        item: np.ndarray | str | Path,
        *,
        options: EngineOptions | None = None,
        key: object = None,
        solo: bool = False,
        on_start: Callable[[], None] | None = None,
    ) -> Future:
        """Queue one file; its Future gives a Transcript or raises that file's own error.

        ``on_start`` is called (in a preparing thread) when work on the file begins: a worker
        counts the job's attempt there, not while it only waits. ``solo``: decode it alone.
        """
        o = options or self.options
        future: Future = Future()
        state = FileState(key=key, options=o, future=future, solo=solo)
        if o.language and not self.loaded.is_multilingual and o.language.lower() != "en":
            future.set_exception(
                UnsupportedLanguage(f"model {self.loaded.name} is English-only; it cannot transcribe language {o.language!r}")
            )
            return future
        with self._cond:
            self._preparing += 1
            self._last_submit = time.monotonic()
        self._pool.submit(self._prepare, state, item, on_start)
        return future

    def _prepare(self, state: FileState, item, on_start) -> None:
        try:
            if on_start is not None:
                on_start()
            p = prepare(item, self.loaded.dims.n_mels, decode=self._decoders.iter_audio)
            state.mel, state.audio_s, state.decoded_s, state.warnings = p.mel, p.audio_s, p.decoded_s, p.warnings
            with self._cond:
                self.stats.files += 1
                self.stats.audio_s += p.audio_s
                self.stats.prepare_decode_s += p.decode_wall_s
                self.stats.prepare_mel_s += p.mel_wall_s
            if not self.loaded.is_multilingual:
                state.language = "en"
            elif state.options.language:
                state.language = state.options.language.lower()
        except BaseException as e:  # the file's own error: recorded on its job, the rest go on
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()
            state.future.set_exception(e)
            return
        with self._cond:
            self._preparing -= 1
            if state.mel is None:  # nothing to decode: done at once
                self._finish(state)
            else:
                self._waiting.append(state)
            self._cond.notify_all()

    def busy(self) -> bool:
        with self._cond:
            return bool(self._rows or self._waiting or self._preparing)

    def wait_for_work(self, timeout_s: float | None = None) -> bool:
        """Block until a file waits for a row or rows are running (False on timeout)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._rows or self._waiting, timeout=timeout_s)

    def run_until_done(self, futures: Sequence[Future]) -> None:
        """Drive the session in this thread until every one of ``futures`` is resolved."""
        while not all(f.done() for f in futures):
            if not self.step():
                with self._cond:
                    self._cond.wait(timeout=0.05)

    def serve(self, stop: threading.Event) -> None:
        """Drive the session until ``stop`` is set (a worker's driver thread)."""
        idle_since = None
        while not stop.is_set():
            if self.step():
                idle_since = None
                continue
            if idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > 5.0:
                if memory_backend() != "cuda":  # CUDA's pool keeps them anyway (engine.cuda_pool)
                    holder.clear_cache()  # idle: hand MLX's cached buffers back
                idle_since = float("inf")
            t0 = time.monotonic()
            self.wait_for_work(timeout_s=0.2)
            self.stats.idle_s += time.monotonic() - t0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._decoders.close()
        for row in self._rows:
            if row.file.mel is not None:
                row.file.mel.close()

    # --- one round ----------------------------------------------------------------------------

    def step(self) -> bool:
        """Admit waiting files into free rows, then encode and decode one window per row.

        Returns False when there was nothing to do."""
        with self._step_lock:
            if not self._rows:
                self._wait_to_fill()
            self._admit()
            if not self._rows:
                return False
            rows = list(self._rows)
            idle = self.batch_size - len(rows)
            self.stats.idle_rows += idle
            if idle and self._preparing:
                self.stats.starved_rows += idle
            if len(self.stats.live_rows) < MAX_TRACE:
                self.stats.live_rows.append(len(rows))
            try:
                self._round(rows)
            except Exception as e:  # beyond one file (out of memory, a device fault): each fails
                log.exception("a batch round failed; its %d file(s) fail with it", len(rows))
                failed = {id(r.file): r.file for r in rows}
                self._rows = [r for r in self._rows if id(r.file) not in failed]
                for f in failed.values():
                    if not f.future.done():
                        f.future.set_exception(BatchFailed(f"batch round failed: {type(e).__name__}: {e}"))
                return True
            finished = []
            for row in rows:
                if row.done:
                    self._rows.remove(row)
                    row.file.open_rows -= 1
                    if row.file.open_rows == 0:
                        finished.append(row.file)
            with self._cond:
                for f in finished:
                    self._finish(f)
            return True

    def _admit(self) -> None:
        """Fill free rows: waiting files first (whole), then cuts of running files (policy below)."""
        with self._cond:
            while len(self._rows) < self.batch_size and self._waiting:
                if any(r.file.solo for r in self._rows):
                    return  # a suspect runs alone
                nxt = longest(self._waiting)
                if nxt.solo and self._rows:
                    return  # wait for the rows to drain
                self._waiting.remove(nxt)
                self._rows.append(Row(nxt, 0, nxt.mel.content_frames, 0, self._initial_prompt(nxt)))
                nxt.open_rows = 1
                if nxt.solo:
                    break
            may_split = (
                not self._waiting
                and not self._preparing
                and time.monotonic() - self._last_submit >= self.split_grace_s
            )
        while may_split and self.min_region_frames and len(self._rows) < self.batch_size:
            row = pick_row_to_split(self._rows, self.min_region_frames)
            if row is None:
                break
            free = self.batch_size - len(self._rows)
            for new in split_row(row, self._initial_prompt(row.file), self.min_region_frames, free + 1):
                self._rows.append(new)
                row.file.open_rows += 1
                self.stats.splits += 1

    def _wait_to_fill(self) -> None:
        """From idle: wait up to FILL_WAIT_S while some but under half the rows' files are ready and
        others are being prepared (policy: files that arrive together start together)."""
        with self._cond:
            self._cond.wait_for(lambda: not (self._preparing and 0 < len(self._waiting) < self.batch_size // 2),
                                timeout=FILL_WAIT_S)

    def _initial_prompt(self, f: FileState) -> list[int]:
        text = f.options.initial_prompt
        return self.loaded.tokenizer().encode(" " + text.strip()) if text else []

    def _round(self, rows: list[Row]) -> None:
        began = time.perf_counter()
        live, sizes = [], []
        for r in rows:
            size = r.file.mel.window_into(self._input.row(len(live)), r.seek, r.end_frame)
            if r.file.mel.flat[r.seek : r.seek + size].all():
                r.file.frames_done += size
                r.seek += size  # digital silence: nothing to decode (its slot is written over)
                continue
            live.append(r)
            sizes.append(size)
        detect, n_windows = self._detection_rows(rows, live, sizes)
        if not live:
            return
        redecoded_before = self.stats.redecoded
        t0 = time.perf_counter()
        self.stats.read_s += t0 - began
        features = encode(self.model, self._input.to_mlx(n_windows).astype(self.loaded.dtype))  # (n, n_audio_ctx, n_audio_state)
        mx.eval(features)
        t1 = time.perf_counter()
        self._detect(detect, features)
        languages = [r.file.language or "en" for r in live]
        results = self._decode_with_fallback(live, features, languages)
        pieces = [self._pieces(r, res, size, lang) for r, res, size, lang in zip(live, results, sizes, languages)]
        t2 = time.perf_counter()
        pieces = self._add_words(live, features, results, sizes, pieces, languages)
        t3 = time.perf_counter()
        st = self.stats
        if self._stalled(t3 - t0):  # a kernel compiling, memory pressure: say where the time went
            log.warning("round %d took %.1f s: encode %.1f, decode %.1f, words %.1f; %d rows, %d decoded again hotter",
                        st.rounds + 1, t3 - t0, t1 - t0, t2 - t1, t3 - t2, len(live), st.redecoded - redecoded_before)
        if len(st.round_ms) < MAX_TRACE:
            if self._first_round_at is None:
                self._first_round_at = t0
            st.round_start_ms.append(round(1000 * (t0 - self._first_round_at)))
            st.round_ms.append(round(1000 * (t3 - t0)))
            st.round_encode_ms.append(round(1000 * (t1 - t0)))
            st.round_words_ms.append(round(1000 * (t3 - t2)))
        st.rounds += 1
        st.windows += n_windows
        st.encode_s += t1 - t0
        st.decode_s += t2 - t1
        st.words_s += t3 - t2
        share = (t3 - t0) / len(live)
        for r, res, size, ps in zip(live, results, sizes, pieces):
            r.file.busy_s += share
            advance(r, res, size, ps, self.rules.ts_begin, self.loaded.dims.n_text_ctx, r.file.options.word_timestamps)

    def _stalled(self, seconds: float) -> bool:
        before = self.stats.round_ms[-20:]
        return len(before) >= 3 and seconds > max(SLOW_ROUND_S, STALL_FACTOR * float(np.median(before)) / 1000)

    def _detection_rows(self, rows, live, sizes) -> tuple[dict[int, tuple[FileState, int]], int]:
        """Files whose language is open get it from their first 30 s, as mlx_whisper detects it:
        from the first window's features where that window is a full one, else from an extra
        window after the live rows' (a short file's detection window holds its padding's frames).
        -> ({id: (file, row)}, the windows the round encodes: the live rows' and the extra ones)"""
        out: dict[int, tuple[FileState, int]] = {}
        extra = len(live)
        for r in rows:
            f = r.file
            if f.language is not None or id(f) in out:
                continue
            index = next((i for i, (x, size) in enumerate(zip(live, sizes)) if x.file is f and x.seek == 0 and size == N_FRAMES), None)
            if index is None:
                index, extra = extra, extra + 1
                self._input.row(index)[:] = f.mel.detection_window()
            out[id(f)] = (f, index)
        return out, extra

    def _detect(self, detect: dict[int, tuple[FileState, int]], features: mx.array) -> None:
        if not detect:
            return
        items = list(detect.values())
        found = window_languages(self.loaded, features[mx.array([i for _, i in items])])
        for (f, _), w in zip(items, found):
            code = max(w.language_probs, key=w.language_probs.get)
            f.language, f.language_probability = code, float(w.language_probs[code])

    def _decode_with_fallback(self, rows: list[Row], features: mx.array, languages: list[str]) -> list[WindowResult]:
        """Every row at its first temperature; rows that fail the thresholds again, hotter, together."""
        tokenizers = [self.loaded.tokenizer(lang, r.file.options.task) for r, lang in zip(rows, languages)]
        results: list[WindowResult | None] = [None] * len(rows)
        todo = list(range(len(rows)))
        level = 0
        while todo:
            groups: dict[float, list[int]] = {}
            for i in todo:
                groups.setdefault(rows[i].file.options.temperatures[level], []).append(i)
            for temperature, idx in groups.items():
                decoded = decode_batch(
                    self.model,
                    [tokenizers[i] for i in idx],
                    features[mx.array(idx)] if len(idx) < features.shape[0] else features,
                    [rows[i].prompt for i in idx],
                    temperature=temperature,
                    options=self.options,
                    rules=self.rules,
                )
                for i, res in zip(idx, decoded):
                    results[i] = res
            level += 1
            todo = [
                i for i in todo
                if level < len(rows[i].file.options.temperatures) and needs_fallback(results[i], rows[i].file.options)
            ]
            self.stats.redecoded += len(todo)
        return results  # type: ignore[return-value]

    def _pieces(self, r: Row, res: WindowResult, size: int, language: str) -> list[Piece]:
        if is_silence(res, r.file.options, size):
            return []
        return window_pieces(r, res, size, self.loaded.tokenizer(language, r.file.options.task), self.rules.ts_begin)

    def _add_words(self, rows, features, results, sizes, pieces, languages) -> list[list[Piece]]:
        """Word timestamps for every row that wants them, and for a cut stretch's windows that reach
        past what it keeps (engine.rows.trim goes by words), in one pass over the round's features."""
        windows, at = [], []
        for i, (r, size, ps, lang) in enumerate(zip(rows, sizes, pieces, languages)):
            if not ps or not (r.file.options.word_timestamps or r.crosses_keep(size)):
                continue
            at.append(i)
            windows.append(
                words.WindowTokens(
                    feature_index=i,
                    offset_s=r.seek * HOP_LENGTH / SAMPLE_RATE,
                    num_frames=size,
                    segments=tuple(p.segment for p in ps),
                    tokens=tuple(p.tokens for p in ps),
                    language=lang,
                    last_speech_s=r.last_speech_s,
                )
            )
        if not windows:
            return pieces
        timed = words.add_word_timestamps(self.loaded, features, windows)
        out = list(pieces)
        for i, segments in zip(at, timed):
            out[i] = [replace(p, segment=seg) for p, seg in zip(pieces[i], segments)]
        return out

    # --- finishing ----------------------------------------------------------------------------

    def _finish(self, f: FileState) -> None:
        """Resolve a file's Future with its Transcript (caller holds self._cond)."""
        try:
            transcript = build_transcript(f, self.loaded.name, self.batch_size, self.device)
        except Exception as e:  # never leave a caller waiting
            f.future.set_exception(e)
        else:
            f.future.set_result(transcript)
        finally:
            if f.mel is not None:
                f.mel.close()


def build_transcript(f: FileState, model_name: str, batch_size: int, device: str) -> Transcript:
    entries = sorted(f.segments, key=lambda e: e[0].start_s)
    segments = tuple(seg for seg, _ in entries)
    if segments and f.options.word_timestamps:
        segments = words.finalize_words(segments)
    text = "".join(raw for _, raw in entries).strip()
    language, probability = f.language, f.language_probability
    if not segments and not f.options.language:
        language, probability = None, None  # no speech: no language
    return Transcript(
        language=language,
        language_probability=probability,
        duration_s=f.audio_s,
        text=text,
        segments=segments,
        timing=Timing(audio_s=f.audio_s, wall_s=f.busy_s, batch_size=batch_size, device=device, model=model_name),
        options=f.options.as_record(),
        decoded_s=f.decoded_s,
        warnings=f.warnings,
    )


# --- the admission and splitting policies ----------------------------------------------------


def longest(waiting: deque[FileState]) -> FileState:
    """The waiting file to admit next: the longest. A file's windows run one after another, so a
    long file admitted last is a tail every other row idles through (a 10-minute file is 21
    rounds); started first, it runs while the short ones come and go."""
    return max(waiting, key=lambda f: f.mel.content_frames)


def pick_row_to_split(rows: list[Row], min_frames: int) -> Row | None:
    """The row with the most audio left, if it can be cut into two stretches of min_frames."""
    candidates = [r for r in rows if r.remaining >= 2 * CUT_SLACK * min_frames and not r.file.solo]
    return max(candidates, key=lambda r: r.remaining, default=None)


def split_row(row: Row, prompt: list[int], min_frames: int, parts: int) -> list[Row]:
    """Cut the row's remaining audio into up to ``parts`` stretches of at least min_frames, each
    cut at the quietest 0.3 s near its even place (and where the plan allows it, within one
    window of the cut before). The row keeps the first stretch; the new rows (no previous text,
    as at a file's start) take the others.

    Each stretch reads on past its cuts to the quietest point LEAD_S away on either side and
    keeps only the words whose middle lies between its cuts (Row.keep). The words at a cut are so
    decoded with the audio around them, as in sequential Whisper's windows, not at a window's
    edge: at the edge a stretch began on a word with no context, or ended on zeros."""
    n = int(min(parts, row.remaining // (min_frames * CUT_SLACK)))
    if n < 2:
        return []
    smooth = np.convolve(row.file.mel.energy, np.ones(QUIET_SPAN_FRAMES) / QUIET_SPAN_FRAMES, mode="same")
    search = int(CUT_SEARCH_S * FRAMES_PER_SECOND)
    step = row.remaining / n
    cuts = [row.seek]
    for k in range(1, n):
        planned = int(row.seek + k * step)
        lo = max(cuts[-1] + min_frames, planned - search)  # every stretch at least min_frames long
        hi = min(row.stop - (n - k) * min_frames, planned + search)
        if step <= N_FRAMES:  # stretches that can fit one window do: a stretch of 31 s costs a second round
            hi = min(hi, cuts[-1] + N_FRAMES)
        cuts.append(quietest(smooth, lo, max(lo + 1, hi)))
    bounds = cuts + [row.stop]
    lead_min, lead_max = (int(s * FRAMES_PER_SECOND) for s in LEAD_S)
    # stretch k reads [starts[k], ends[k]) and keeps [bounds[k], bounds[k + 1]); the last reads to the row's end
    starts = [quietest(smooth, max(bounds[k - 1], bounds[k] - lead_max), bounds[k] - lead_min) for k in range(1, n)]
    ends = [quietest(smooth, b + lead_min, min(row.end_frame, b + lead_max)) for b in bounds[1:-1]] + [row.end_frame]
    keep_from, keep_to = row.keep or (0.0, math.inf)
    keeps = [b / FRAMES_PER_SECOND for b in bounds[1:-1]]
    new = [
        Row(row.file, start, end, start, list(prompt), last_speech_s=start / FRAMES_PER_SECOND, keep=(a, b))
        for start, end, a, b in zip(starts, ends[1:], keeps, keeps[1:] + [keep_to])
    ]
    row.end_frame, row.keep = ends[0], (keep_from, keeps[0])
    return new


def quietest(smooth: np.ndarray, lo: int, hi: int) -> int:
    """The frame in [lo, hi) where the smoothed level is lowest (lo itself if the span is empty)."""
    lo, hi = max(0, lo), min(len(smooth), hi)
    return lo + int(np.argmin(smooth[lo:hi])) if hi > lo else lo
