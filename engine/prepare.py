"""A submitted file made ready for the batch rows: decoded, and its log-mel computed once.

Runs in the session's background threads while the device decodes other files. A path is
decoded 30 s at a time straight into engine.mel (the signal is never held whole); an array is
checked to be mono float32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlx_whisper.audio import SAMPLE_RATE

from engine.audio import DecodeReport, iter_audio
from engine.mel import FileMel, file_mel

MIN_SAMPLES = 160  # shorter audio (< 10 ms, one mel frame) holds nothing to transcribe
CHUNK_S = 30.0  # decoded per step


@dataclass(frozen=True)
class Prepared:
    mel: FileMel | None  # None: nothing to decode (empty, or digital silence)
    audio_s: float
    decoded_s: float | None  # None for an array given directly
    warnings: tuple[str, ...]
    decode_wall_s: float = 0.0  # time spent decoding the container (and resampling)
    mel_wall_s: float = 0.0  # time spent on the log-mel


def prepare(item: np.ndarray | str | Path, n_mels: int, *, decode=iter_audio) -> Prepared:
    """Decode (a path) or check (an array), then compute the FileMel; raises the file's own error.

    ``decode`` has ``iter_audio``'s signature: a session passes its child decoders' (engine.decoders).
    """
    seen = {"samples": 0, "sound": False, "decode_s": 0.0}
    started = time.perf_counter()

    def counted(chunks):
        chunks = iter(chunks)
        while True:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            seen["decode_s"] += time.perf_counter() - t0
            if chunk is None:
                return
            seen["samples"] += len(chunk)
            seen["sound"] = seen["sound"] or bool(np.any(chunk))
            yield chunk

    report = None
    if isinstance(item, (str, Path, bytes)):
        report = DecodeReport()
        mel = file_mel(counted(decode(item, chunk_s=CHUNK_S, report=report)), n_mels)
    else:
        audio = np.asarray(item, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio must be mono (n_samples,), got shape {audio.shape}")
        mel = file_mel(counted([audio]), n_mels)
    audio_s = seen["samples"] / SAMPLE_RATE
    if seen["samples"] < MIN_SAMPLES or not seen["sound"] or mel.content_frames == 0:
        mel.close()
        mel = None
    return Prepared(
        mel=mel,
        audio_s=audio_s,
        decoded_s=(report.decoded_s or audio_s) if report is not None else None,
        warnings=tuple(report.warnings) if report is not None else (),
        decode_wall_s=seen["decode_s"],
        mel_wall_s=time.perf_counter() - started - seen["decode_s"],
    )
