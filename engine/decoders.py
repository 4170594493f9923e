"""Containers decoded in child processes, so decoding never waits on the driver thread's GIL.

On a GPU the thread that drives the batch spends most of its time in Python, dispatching MLX
calls. Decoding threads beside it (PyAV and soxr hand the GIL back and forth many times per second
of audio) waited on it: on one H100, `archive-asr run` spent 418 thread-seconds decoding 3.2 hours
of audio (one thread alone decodes such a mix of containers at ~2,000x real time), and ran at 0.24
of the engine's speed. Here each preparing thread owns one long-lived child (``python -m
engine.decoders``) that runs ``engine.audio.iter_audio`` and streams 30 s chunks back through a
pipe: one GIL hand-off per chunk instead of one per packet. A decoder that crashes on a damaged
file (FFmpeg can) fails that file alone; the next file gets a fresh child. Measured on the same
H100 archive after the change: 31.5 thread-seconds of decoding, and the run over its jobs' span
at 0.70 of the engine alone (README, "archive-asr run end to end").

Plain subprocesses, not multiprocessing: nothing is forked from a process that holds MLX (not
fork-safe on macOS), no pickling, and a child exits when its parent's pipe closes.

Wire format, both ways a frame: 1 byte kind, 4 bytes length (big-endian), payload.
Parent -> child: b"P" path (the file system's bytes) followed by b"C" chunk seconds (ASCII).
Child -> parent: b"A" float32 samples (native order) ..., then b"D" the DecodeReport as JSON, or
b"E" {"message", "report"} for a file with no decodable audio.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engine.audio import DecodeReport, iter_audio
from engine.errors import AudioDecodeError

HEADER = struct.Struct(">cI")


def _write(out, kind: bytes, payload: bytes) -> None:
    out.write(HEADER.pack(kind, len(payload)))
    out.write(payload)


def _read_exact(src, n: int) -> bytes:
    data = src.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _read(src) -> tuple[bytes, bytes]:
    kind, size = HEADER.unpack(_read_exact(src, HEADER.size))
    return kind, _read_exact(src, size) if size else b""


class Decoder:
    """One child process decoding one file at a time."""

    def __init__(self) -> None:
        # stderr is inherited: the decoder's warnings reach the worker's log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.decoders"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()

    def chunks(self, path: Path, chunk_s: float, report: DecodeReport) -> Iterator[np.ndarray]:
        """``iter_audio(path, chunk_s, report=report)``, decoded in the child. A generator left
        before the end leaves the child mid-file: the caller must close this decoder then."""
        try:
            _write(self.proc.stdin, b"P", os.fsencode(path))
            _write(self.proc.stdin, b"C", repr(chunk_s).encode())
            self.proc.stdin.flush()
            while True:
                kind, payload = _read(self.proc.stdout)
                if kind == b"A":
                    yield np.frombuffer(payload, np.float32)
                    continue
                if kind == b"D":
                    _fill(report, json.loads(payload))
                    return
                if kind == b"E":
                    error = json.loads(payload)
                    _fill(report, error["report"])
                    raise AudioDecodeError(error["message"])
                raise EOFError
        except (EOFError, OSError) as e:  # the child died (or the stream broke): this child is done
            if self.alive():
                self.proc.kill()
            code = self.proc.wait()
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            raise AudioDecodeError(f"{path}: the audio decoder crashed on this file ({how})") from e


def _fill(report: DecodeReport, fields: dict) -> None:
    report.decoded_s = fields["decoded_s"]
    report.warnings[:] = fields["warnings"]
    report.stated_s = fields["stated_s"]
    report.gaps_s[:] = [tuple(g) for g in fields["gaps_s"]]
    report.reason = fields["reason"]


class DecoderPool:
    """Idle decoders, lent to one preparing thread at a time; started as threads first need them."""

    def __init__(self) -> None:
        self._idle: list[Decoder] = []
        self._all: set[Decoder] = set()
        self._lock = threading.Lock()
        self._closed = False

    def iter_audio(self, path: str | Path, chunk_s: float, *, report: DecodeReport) -> Iterator[np.ndarray]:
        with self._lock:
            if self._closed:
                raise RuntimeError("decoder pool closed")
            decoder = self._idle.pop() if self._idle else None
        if decoder is not None and not decoder.alive():  # died while idle (killed from outside): reap it
            with self._lock:
                self._all.discard(decoder)
            decoder.close()
            decoder = None
        if decoder is None:
            decoder = Decoder()
            with self._lock:
                self._all.add(decoder)
        finished = False
        try:
            yield from decoder.chunks(Path(path), chunk_s, report)
            finished = True
        except AudioDecodeError:
            finished = decoder.alive()  # the file's own error, reported cleanly: the child is reusable
            raise
        finally:
            with self._lock:
                if finished and not self._closed:
                    self._idle.append(decoder)
                else:
                    self._all.discard(decoder)
                    decoder.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            decoders, self._all, self._idle = list(self._all), set(), []
        for d in decoders:
            d.close()


def _serve() -> None:
    """The child: decode each requested file, stream its chunks, report; exit when stdin closes."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the stream of samples
    src = sys.stdin.buffer
    while True:
        try:
            _, path = _read(src)
            _, chunk = _read(src)
        except EOFError:
            return
        report = DecodeReport()
        try:
            for samples in iter_audio(os.fsdecode(path), float(chunk), report=report):
                _write(out, b"A", np.ascontiguousarray(samples, np.float32).tobytes())
        except AudioDecodeError as e:
            _write(out, b"E", json.dumps({"message": str(e), "report": asdict(report)}).encode())
        except Exception as e:  # noqa: BLE001  (anything else the decoders raise is this file's problem)
            message = f"{os.fsdecode(path)}: cannot decode ({type(e).__name__}: {e})"
            _write(out, b"E", json.dumps({"message": message, "report": asdict(report)}).encode())
        else:
            _write(out, b"D", json.dumps(asdict(report)).encode())
        out.flush()


if __name__ == "__main__":
    try:
        _serve()
    except (BrokenPipeError, KeyboardInterrupt):  # the parent went away
        pass
