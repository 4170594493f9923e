"""Audio in: any container an archive holds, decoded to float32 16 kHz mono.

libsndfile (soundfile) reads WAV, FLAC, Ogg Vorbis/Opus, AIFF and friends exactly and fast; FFmpeg
(PyAV) reads the rest (MP3, AAC/M4A, MP4, WebM, ...). MP3 goes through FFmpeg too: it honours
the encoder delay (gapless info), so timestamps match what Whisper's own ffmpeg loader gives.
Channels are averaged, then soxr resamples to 16 kHz in a stream, so ``iter_audio`` holds one chunk
at a time whatever the file's length.

A damaged tail (archives are full of them) yields the audio before it, with a warning; a file
with no decodable audio at all raises ``AudioDecodeError`` with a readable reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from engine.errors import AudioDecodeError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # Whisper's input rate
READ_BLOCK_S = 10.0  # source audio decoded per step by soundfile
SALVAGE_BLOCK_FRAMES = 1024  # after a read error, re-read in pieces this small to keep what precedes it
RESAMPLE_QUALITY = "HQ"  # soxr's high quality; "VHQ" costs more for no audible gain at 16 kHz
# soundfile formats that FFmpeg decodes better (gapless MP3: libsndfile keeps the encoder delay)
PREFER_FFMPEG = {"MP3", "MPEG"}


@dataclass
class DecodeReport:
    """What one pass of ``iter_audio`` delivered, filled in as it runs (read it after the last chunk)."""

    decoded_s: float = 0.0  # seconds yielded at 16 kHz (silence standing in for lost audio included)
    warnings: list[str] = field(default_factory=list)  # the decoder's reasons, one readable line each


def _soundfile_open(path: Path) -> sf.SoundFile | None:
    """A SoundFile for ``path``, or None when libsndfile can't read it (or shouldn't)."""
    try:
        f = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return None
    if f.format in PREFER_FFMPEG:
        f.close()
        return None
    return f


def _soundfile_blocks(f: sf.SoundFile, path: Path) -> Iterator[tuple[np.ndarray, int]]:
    """Mono float32 blocks at the file's rate; stops with a warning at a damaged frame."""
    block = max(1, int(READ_BLOCK_S * f.samplerate))
    with f:
        while True:
            start = f.tell()
            try:
                data = f.read(block, dtype="float32", always_2d=True)  # (frames, channels)
            except sf.LibsndfileError as e:
                yield from _salvage(f, start, path, e)
                return
            if not len(data):
                return
            yield data.mean(axis=1), f.samplerate


def _salvage(f: sf.SoundFile, start: int, path: Path, error: Exception) -> Iterator[tuple[np.ndarray, int]]:
    """Re-read a block that failed in small pieces, keeping everything before the damage."""
    kept = 0
    try:
        f.seek(start)
        while len(data := f.read(SALVAGE_BLOCK_FRAMES, dtype="float32", always_2d=True)):
            kept += len(data)
            yield data.mean(axis=1), f.samplerate
    except sf.LibsndfileError:
        pass
    end_s = (start + kept) / f.samplerate
    log.warning("%s: damaged audio after %.2f s (%s); keeping the audio before it", path, end_s, error)


def _ffmpeg_blocks(path: Path) -> Iterator[tuple[np.ndarray, int]]:
    """Mono float32 blocks at the stream's rate through PyAV; skips (and reports) undecodable packets."""
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise AudioDecodeError(f"{path}: not an audio file FFmpeg or libsndfile can read ({e.strerror or e})") from e
    with container:
        if not container.streams.audio:
            raise AudioDecodeError(f"{path}: not an audio file (no audio stream; FFmpeg reads it as {container.format.long_name})")
        stream = container.streams.audio[0]
        stream.thread_type = "AUTO"
        # planar float, source layout and rate: we downmix and resample ourselves (soxr)
        to_float = av.AudioResampler(format="fltp")
        bad_packets, good_frames, error = 0, 0, None
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                bad_packets, error = bad_packets + 1, e
                continue
            for frame in frames:
                for converted in to_float.resample(frame):
                    good_frames += 1
                    yield converted.to_ndarray().mean(axis=0), converted.sample_rate  # (channels, n) -> (n,)
        if bad_packets:
            if not good_frames:
                raise AudioDecodeError(f"{path}: no decodable audio ({error})")
            log.warning("%s: skipped %d undecodable packet(s) (%s)", path, bad_packets, error)


def _decoded_blocks(path: str | Path) -> Iterator[tuple[np.ndarray, int]]:
    path = Path(path)
    if not path.is_file():
        raise AudioDecodeError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioDecodeError(f"{path}: empty file (0 bytes)")
    f = _soundfile_open(path)
    return _soundfile_blocks(f, path) if f is not None else _ffmpeg_blocks(path)


def iter_audio(path: str | Path, chunk_s: float = 30.0, *, report: DecodeReport | None = None) -> Iterator[np.ndarray]:
    """Consecutive float32 16 kHz mono chunks of ``chunk_s`` seconds (the last one shorter).

    Memory stays at a few chunks whatever the file's length; raises AudioDecodeError for a file
    with no decodable audio (before yielding anything).
    """
    chunk = int(round(chunk_s * SAMPLE_RATE))
    if chunk <= 0:
        raise ValueError("chunk_s must be positive")
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
            yield joined[:size]
            rest = joined[size:]
            pending, n_pending = ([rest] if len(rest) else []), len(rest)

    def add(out: np.ndarray) -> None:
        nonlocal n_pending, n_total
        if len(out):
            pending.append(out)
            n_pending += len(out)
            n_total += len(out)

    for block, block_rate in _decoded_blocks(path):
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
    yield from take(final=True)


def load_audio(path: str | Path) -> np.ndarray:
    """The whole file as float32 16 kHz mono, shape (n_samples,)."""
    chunks = list(iter_audio(path, chunk_s=600.0))
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
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"{path}: not an audio file (no audio stream)")
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / av.time_base
    except av.error.FFmpegError as e:
        raise AudioDecodeError(f"{path}: not an audio file FFmpeg or libsndfile can read ({e})") from e
    return sum(len(c) for c in iter_audio(path, chunk_s=600.0)) / SAMPLE_RATE
