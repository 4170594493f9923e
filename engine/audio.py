"""Audio in: any container an archive holds, decoded to float32 16 kHz mono, on the file's timeline.

libsndfile (soundfile) reads WAV, FLAC, AIFF and friends exactly and fast; FFmpeg (PyAV) reads the
rest (MP3, AAC/M4A, MP4, WebM, Ogg, ...). MP3 goes through FFmpeg: it honours the encoder delay
(gapless info), so timestamps match what Whisper's own ffmpeg loader gives. Ogg goes through
FFmpeg too: libsndfile drops a damaged Ogg page's audio without a trace, FFmpeg's granule
positions say how much is missing. Channels are averaged, then soxr resamples to 16 kHz in a
stream, so ``iter_audio`` holds one chunk at a time whatever the file's length.

Damage keeps the timeline: audio lost in the middle (a corrupt MP3/AAC stretch, a damaged FLAC
frame) becomes silence of the same length, so every later word keeps its time; a damaged or
missing tail yields the audio before it. Each is one line in ``DecodeReport.warnings``, and so is
a decoded length that falls short of the header's. Where the length of a gap comes from:
- containers with timestamps (MP4, WebM/Matroska, Ogg, FLAC frame numbers): the next good frame's;
- MP3 and ADTS AAC, whose demuxers number packets one after another (bytes skipped while they
  resync move no timestamp): the header's duration minus what the packets cover (an MP3 with a
  Xing/Info/VBRI header states its length exactly), else the bytes outside good packets at the
  stream's mean bit rate; shared among several damaged stretches in proportion to their bytes.
Raw ADTS AAC states no length (FFmpeg's is a bit-rate guess), so a cut one is not reported short.
A libsndfile read error hands the rest of the file, from the failed block on, to FFmpeg.

A file with no decodable audio at all raises ``AudioDecodeError`` with a readable reason.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack, contextmanager, nullcontext
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from engine.errors import AudioDecodeError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # Whisper's input rate
READ_BLOCK_S = 10.0  # source audio decoded per step by soundfile
RESAMPLE_QUALITY = "HQ"  # soxr's high quality; "VHQ" costs more for no audible gain at 16 kHz
# soundfile formats that FFmpeg decodes better: gapless MP3 (libsndfile keeps the encoder delay);
# Ogg (libsndfile closes the gap a damaged page leaves, moving every later word)
PREFER_FFMPEG = {"MP3", "MPEG", "OGG"}
# FFmpeg demuxers whose packet timestamps are a running count, blind to bytes skipped at damage
SEQUENTIAL_PTS_FORMATS = {"mp3", "aac", "ac3", "eac3", "mp2", "adts"}
# FFmpeg demuxers whose stated duration is a bit-rate estimate (raw ADTS AAC: off by 1-4 % on our clips)
ESTIMATED_LENGTH_FORMATS = {"aac"}
GAP_TOLERANCE_S = 0.002  # a jump below this is rounding, never a gap
# Vorbis frames' timestamps wobble by up to a block (tens of ms) in intact files: a jump below this
# is a gap only right after an undecodable packet
JITTER_S = 0.05
GATHER_S = 2.0  # FFmpeg's contiguous frames handed on together, up to this much audio (see _ffmpeg_blocks)
OVERSIZED_PACKET = 4  # a packet this many times the median size swallowed damaged bytes
SHORT_OF_HEADER_S = 1.0  # a decoded length this far below the header's stated one is reported
MAX_GAP_WARNINGS = 10  # one line per damaged stretch up to this many, then one line for the rest
MAX_FRAME_BYTES = 8192  # no MP3 or ADTS frame is larger: a bigger packet holds damaged bytes
VBR_HEADER_WINDOW = 2048  # bytes before the first MP3 packet searched for a Xing/Info/VBRI tag


@dataclass
class DecodeReport:
    """What one pass of ``iter_audio`` delivered, filled in as it runs (read it after the last chunk)."""

    decoded_s: float = 0.0  # seconds yielded at 16 kHz (silence standing in for lost audio included)
    warnings: list[str] = field(default_factory=list)  # the decoder's reasons, one readable line each
    stated_s: float | None = None  # the duration the file's header states; None: it states none
    gaps_s: list[tuple[float, float]] = field(default_factory=list)  # (start_s, length_s) filled with silence
    reason: str | None = None  # the decoder's last complaint, for a file that ends early

    def warn(self, path: Path, message: str) -> None:
        self.warnings.append(message)
        log.warning("%s: %s", path, message)


def _fs_name(path: Path) -> str | bytes:
    """The path as libraries take it: str when it encodes as UTF-8, the file system's bytes when not."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path)
    return str(path)


@contextmanager
def _av_open(path: Path) -> Iterator:
    """av.open on the path, or on an open binary file when the name is not valid UTF-8 (PyAV takes only str)."""
    import av

    name = _fs_name(path)
    with open(name, "rb") if isinstance(name, bytes) else nullcontext(name) as source:
        with av.open(source) as container:
            yield container


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return text.removeprefix("Error : ").strip()


def _soundfile_open(path: Path) -> sf.SoundFile | None:
    """A SoundFile for ``path``, or None when libsndfile can't read it (or shouldn't)."""
    try:
        f = sf.SoundFile(_fs_name(path))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return None
    if f.format in PREFER_FFMPEG:
        f.close()
        return None
    return f


def _soundfile_blocks(f: sf.SoundFile, path: Path, report: DecodeReport) -> Iterator[tuple[np.ndarray, int]]:
    """Mono float32 blocks at the file's rate; a read error hands the rest to FFmpeg from the failed block."""
    block = max(1, int(READ_BLOCK_S * f.samplerate))
    report.stated_s = f.frames / f.samplerate if f.frames > 0 else None
    with f:
        while True:
            start = f.tell()
            try:
                data = f.read(block, dtype="float32", always_2d=True)  # (frames, channels)
            except sf.LibsndfileError as e:
                error = e
                break
            if not len(data):
                return
            yield data.mean(axis=1), f.samplerate
        rate = f.samplerate
    log.info("%s: libsndfile stopped at %.2f s (%s); FFmpeg decodes the rest", path, start / rate, _reason(error))
    n_warnings = len(report.warnings)
    try:
        end_s = yield from _ffmpeg_blocks(path, report, from_s=start / rate, rate_hint=rate, reason=_reason(error))
    except AudioDecodeError as e:
        report.warn(path, f"damaged audio after {start / rate:.2f} s ({_reason(error)}; FFmpeg: {str(e).removeprefix(f'{path}: ')}); "
                          "the audio before it is kept")
        return
    report.reason = report.reason or _reason(error)
    short = report.stated_s is not None and report.stated_s - end_s > SHORT_OF_HEADER_S  # iter_audio says so
    if len(report.warnings) == n_warnings and not short:  # FFmpeg read on without a word: say what libsndfile saw
        report.warn(path, f"damaged audio in {start / rate:.2f}-{(start + block) / rate:.2f} s ({_reason(error)}); "
                          f"FFmpeg decoded it, to {end_s:.2f} s")


@dataclass
class _Packet:
    pos: int
    size: int
    duration_s: float
    ok: bool  # decoded without an error


def _has_vbr_header(path: Path, first_pos: int) -> bool:
    """Whether an MP3 states its exact frame count (Xing/Info/VBRI tag in the frame before the audio)."""
    with open(_fs_name(path), "rb") as f:
        start = max(0, first_pos - VBR_HEADER_WINDOW)
        f.seek(start)
        window = f.read(first_pos - start + 64)
    return any(tag in window for tag in (b"Xing", b"Info", b"VBRI"))


def _resync_gaps(path: Path, stream_index: int, stated_end_s: float | None, fmt: str) -> dict[int, float]:
    """Seconds of audio lost before each packet (keyed by byte position) in a sequential-timestamp stream.

    Run once, at the first sign of damage: one more pass over the file (MP3/AAC decode at hundreds
    of times real time) finds the damaged spots: after a run of undecodable packets, at a jump
    between one packet's end and the next one's start, after an oversized packet that swallowed
    damaged bytes. The time lost is the header's exact length minus what the packets cover (MP3
    with a Xing/Info/VBRI tag), else every byte outside a good packet at the stream's mean byte
    rate; it is shared among the spots by the bytes lost at each (the ADTS demuxer skips garbage
    without a trace: those bytes are shared evenly).
    """
    import av

    packets: list[_Packet] = []
    with _av_open(path) as container:
        stream = container.streams[stream_index]
        tb = float(stream.time_base)
        for p in container.demux(stream):
            if p.pos is None or p.pos < 0 or not p.size:
                continue
            try:
                p.decode()
                ok = True
            except av.error.FFmpegError:
                ok = False
            packets.append(_Packet(pos=p.pos, size=p.size, duration_s=(p.duration or 0) * tb, ok=ok))
    if len(packets) < 2:
        return {}
    median = float(np.median([p.size for p in packets]))
    good = [p.ok and p.size <= OVERSIZED_PACKET * median for p in packets]
    spots: dict[int, int] = {}  # byte position of the first good packet after damage -> bytes lost there
    run_bytes = 0  # bytes of undecodable or oversized packets since the last good one
    for prev, p, prev_good, p_good in zip(packets, packets[1:], good, good[1:]):
        if not prev_good:
            run_bytes += prev.size
        jump = max(0, p.pos - (prev.pos + prev.size))
        if p_good and (run_bytes or jump):
            spots[p.pos], run_bytes = run_bytes + jump, 0
    if not spots:
        return {}
    covered_s = sum(p.duration_s for p in packets)
    good_bytes = sum(p.size for p, g in zip(packets, good) if g)
    lost_bytes = max(0, os.path.getsize(_fs_name(path)) - packets[0].pos - good_bytes)
    if fmt == "mp3" and stated_end_s is not None and _has_vbr_header(path, packets[0].pos):
        lost_s = max(0.0, stated_end_s - covered_s)  # exact: the header counts every frame
    else:
        # every byte not in a good packet held audio at the stream's mean rate; the undecodable
        # packets' own durations are on the timeline already
        bytes_per_s = good_bytes / max(sum(p.duration_s for p, g in zip(packets, good) if g), 1e-9)
        lost_s = max(0.0, lost_bytes / bytes_per_s - sum(p.duration_s for p, g in zip(packets, good) if not g))
    # bytes skipped where no packet shows it (the ADTS demuxer's resync) are shared out evenly
    hidden = max(0, lost_bytes - sum(spots.values()))
    weights = {pos: n + hidden / len(spots) for pos, n in spots.items()}
    total = sum(weights.values())
    return {pos: lost_s * w / total for pos, w in weights.items()} if total else {}


def _ffmpeg_blocks(path: Path, report: DecodeReport, *, from_s: float = 0.0, rate_hint: int | None = None,
                   reason: str | None = None) -> Generator[tuple[np.ndarray, int], None, float]:
    """Mono float32 blocks at the stream's rate through PyAV, on the stream's timeline.

    Frames are placed by their timestamps: a jump forward (packets lost to damage) is filled with
    silence, an overlap is trimmed. With ``from_s`` (a libsndfile fallback) the audio before that
    time is skipped: the caller already has it; ``reason`` is why the caller gave up. Returns the
    time the audio ends at.
    """
    import av

    with ExitStack() as stack:
        try:
            container = stack.enter_context(_av_open(path))
        except av.error.FFmpegError as e:
            raise AudioDecodeError(f"{path}: not an audio file FFmpeg or libsndfile can read ({_reason(e)})") from e
        if not container.streams.audio:
            raise AudioDecodeError(f"{path}: not an audio file (no audio stream; FFmpeg reads it as {container.format.long_name})")
        stream = container.streams.audio[0]
        stream.thread_type = "SLICE"  # frame threads deliver frames (and errors) late: no telling which packet failed
        tb = stream.time_base
        start_s = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
        if container.format.name in ESTIMATED_LENGTH_FORMATS:
            stated_s = None  # FFmpeg guesses it from the bit rate: no header says it
        elif stream.duration is not None and tb:
            stated_s = float(stream.duration * tb)
        elif container.duration is not None:
            stated_s = container.duration / av.time_base
        else:
            stated_s = None
        if report.stated_s is None:
            report.stated_s = stated_s
        if from_s > 1.0 and tb:
            # start near the failed block (FLAC seeks by its frame numbers); frames before from_s are trimmed
            container.seek(int((from_s - 1.0) / tb), stream=stream, backward=True)
        sequential = container.format.name in SEQUENTIAL_PTS_FORMATS
        gaps: dict[int, float] | None = None  # found lazily, at the first sign of damage

        def find_gaps() -> dict[int, float]:
            stated_end_s = stated_s + start_s if stated_s else None
            return _resync_gaps(path, stream.index, stated_end_s, container.format.name)

        shift_s = 0.0  # audio lost before this point that the timestamps don't know about
        # planar float, source layout and rate: we downmix and resample ourselves (soxr)
        to_float = av.AudioResampler(format="fltp")
        rate = rate_hint or stream.codec_context.sample_rate or stream.rate
        cursor: int | None = round(from_s * rate) if from_s else None  # next sample (at `rate`) on the timeline
        origin = 0  # the timeline's sample that is the caller's first (MP3: after the encoder delay)
        skipping = bool(from_s)  # still before from_s: trim exactly
        bad_packets, good_frames, error = 0, 0, None
        error_since_last_frame = False
        prev_end: int | None = None
        n_gaps = 0
        # Frames are small (an Opus frame is 20 ms), and handling each one in Python (conversion,
        # downmix, one resampler call) cost twice the decoding itself; contiguous frames are
        # gathered and handed on together, (channels, n) planes joined, mixed down once.
        pending: list[np.ndarray] = []
        n_pending = 0

        def flush() -> np.ndarray | None:
            nonlocal pending, n_pending
            if not pending:
                return None
            planes = pending[0] if len(pending) == 1 else np.concatenate(pending, axis=1)  # (channels, n)
            pending, n_pending = [], 0
            return planes[0] if len(planes) == 1 else planes.mean(axis=0)

        for packet in container.demux(stream):
            if sequential and packet.size and packet.pos is not None and packet.pos >= 0:
                resynced = prev_end is not None and packet.pos > prev_end
                prev_end = packet.pos + packet.size
                if gaps is None and (resynced or error_since_last_frame or packet.size > MAX_FRAME_BYTES):
                    gaps = find_gaps()
                if gaps:
                    shift_s += gaps.get(packet.pos, 0.0)
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                bad_packets, error, error_since_last_frame = bad_packets + 1, e, True
                report.reason = reason or _reason(e)
                if sequential and gaps is None:
                    gaps = find_gaps()
                continue
            for frame in frames:
                if frame.sample_rate != rate:
                    if (block := flush()) is not None:
                        yield block, rate
                    rate, cursor = frame.sample_rate, None  # a rate change restarts the timeline (rare)
                frame_tb = frame.time_base or tb
                # (pts * numerator / denominator: the float of the exact fraction, without making one)
                at = (round((frame.pts * frame_tb.numerator / frame_tb.denominator + shift_s) * rate)
                      if frame.pts is not None and frame_tb else None)
                if cursor is None:
                    cursor = origin = at if at is not None else 0
                if at is None:
                    at = cursor
                converted = (frame,) if frame.format.name == "fltp" else to_float.resample(frame)
                planes = [c.to_ndarray() for c in converted]  # each (channels, n) float32
                data = planes[0] if len(planes) == 1 else np.concatenate(planes, axis=1)
                if pending and len(data) != len(pending[0]):  # the channel count changed (rare)
                    yield flush(), rate
                # a jump is damage after an undecodable packet, or when longer than a frame's wobble
                slack = round((GAP_TOLERANCE_S if error_since_last_frame or skipping else JITTER_S) * rate)
                if at > cursor + slack:
                    n_gaps += 1
                    gap_s, gap_at_s = (at - cursor) / rate, (cursor - origin) / rate
                    report.gaps_s.append((gap_at_s, gap_s))
                    if n_gaps <= MAX_GAP_WARNINGS:
                        why = reason or (_reason(error) if error_since_last_frame and error is not None else None)
                        report.warn(path, f"{gap_s:.2f} s of damaged audio at {gap_at_s:.2f} s replaced by silence"
                                          + (f" ({why})" if why else " (the container's timestamps jump)"))
                    if (block := flush()) is not None:
                        yield block, rate
                    yield np.zeros(at - cursor, np.float32), rate
                    cursor = at
                elif at < cursor - slack:
                    data = data[:, cursor - at :]  # overlaps what we have (or precedes from_s)
                error_since_last_frame = False
                if data.shape[1]:
                    good_frames += 1
                    skipping = False
                    cursor += data.shape[1]
                    pending.append(data)
                    n_pending += data.shape[1]
                    if n_pending >= rate * GATHER_S and (block := flush()) is not None:
                        yield block, rate
        if (block := flush()) is not None:
            yield block, rate
        if n_gaps > MAX_GAP_WARNINGS:
            rest = report.gaps_s[MAX_GAP_WARNINGS:]
            report.warn(path, f"{len(rest)} more damaged stretch(es), {sum(g for _, g in rest):.2f} s in all, "
                              "replaced by silence")
        if bad_packets and not good_frames and not from_s:
            raise AudioDecodeError(f"{path}: no decodable audio ({_reason(error)})")
        end_s = ((cursor or 0) - origin) / rate
        short = report.stated_s is not None and report.stated_s - end_s > SHORT_OF_HEADER_S  # iter_audio says so
        if error_since_last_frame and not short:
            report.warn(path, f"damaged audio after {end_s:.2f} s ({reason or _reason(error)}); the audio before it is kept")
        return end_s


def _decoded_blocks(path: Path, report: DecodeReport) -> Iterator[tuple[np.ndarray, int]]:
    if not path.is_file():
        raise AudioDecodeError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioDecodeError(f"{path}: empty file (0 bytes)")
    f = _soundfile_open(path)
    return _soundfile_blocks(f, path, report) if f is not None else _ffmpeg_blocks(path, report)


def iter_audio(path: str | Path, chunk_s: float = 30.0, *, report: DecodeReport | None = None) -> Iterator[np.ndarray]:
    """Consecutive float32 16 kHz mono chunks of ``chunk_s`` seconds (the last one shorter).

    Memory stays at a few chunks whatever the file's length; raises AudioDecodeError for a file
    with no decodable audio (before yielding anything). ``report``, if given, is filled in as the
    chunks go: seconds delivered and one warning per thing the decoder had to say.
    """
    chunk = int(round(chunk_s * SAMPLE_RATE))
    if chunk <= 0:
        raise ValueError("chunk_s must be positive")
    path = Path(path)
    report = report if report is not None else DecodeReport()
    pending: list[np.ndarray] = []
    n_pending = 0
    n_total = 0
    stream: soxr.ResampleStream | None = None
    rate = 0

    def take(final: bool) -> Iterator[np.ndarray]:
        nonlocal pending, n_pending
        while n_pending >= chunk or (final and n_pending):
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            size = min(chunk, n_pending)
            report.decoded_s += size / SAMPLE_RATE
            yield joined[:size]
            rest = joined[size:]
            pending, n_pending = ([rest] if len(rest) else []), len(rest)

    def add(out: np.ndarray) -> None:
        nonlocal n_pending, n_total
        if len(out):
            pending.append(out)
            n_pending += len(out)
            n_total += len(out)

    for block, block_rate in _decoded_blocks(path, report):
        if stream is None or block_rate != rate:
            if stream is not None:  # the rate changed mid-stream (rare; some broadcasts): flush the old one
                add(stream.resample_chunk(np.zeros(0, np.float32), last=True))
            rate = block_rate
            stream = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, "float32", RESAMPLE_QUALITY)
        out = np.ascontiguousarray(block, dtype=np.float32)
        add(stream.resample_chunk(out) if stream is not None else out)
        yield from take(final=False)
    if stream is not None:
        add(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    if n_total == 0:
        raise AudioDecodeError(f"{path}: contains no audio samples")
    decoded_s = n_total / SAMPLE_RATE
    if report.stated_s is not None and report.stated_s - decoded_s > SHORT_OF_HEADER_S:
        why = f"; {report.reason}" if report.reason else ""
        report.warn(path, f"audio ends at {decoded_s:.1f} s of {report.stated_s:.1f} s stated in the header "
                          f"(truncated file?{why})")
    yield from take(final=True)


def load_audio(path: str | Path, *, report: DecodeReport | None = None) -> np.ndarray:
    """The whole file as float32 16 kHz mono, shape (n_samples,)."""
    chunks = list(iter_audio(path, chunk_s=600.0, report=report))
    return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]


def probe_duration_s(path: str | Path) -> float:
    """The file's duration in seconds from its header, decoding only when the header doesn't say.

    For raw AAC/MP3 streams without a length in the header FFmpeg estimates it from the bit rate.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioDecodeError(f"{path}: no such file")
    f = _soundfile_open(path)
    if f is not None:
        with f:
            return f.frames / f.samplerate
    import av

    try:
        with _av_open(path) as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"{path}: not an audio file (no audio stream)")
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / av.time_base
    except av.error.FFmpegError as e:
        raise AudioDecodeError(f"{path}: not an audio file FFmpeg or libsndfile can read ({_reason(e)})") from e
    return sum(len(c) for c in iter_audio(path, chunk_s=600.0)) / SAMPLE_RATE
