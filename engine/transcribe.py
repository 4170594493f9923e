"""Audio in, Transcript records out: one-call front doors to the engine session (engine.session).

A worker keeps one Session for its life; these functions make one for the call, submit every
input, and drive it until each has its Transcript. Every file is decoded as sequential Whisper
decodes it, its windows batched with those of the other files given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from engine.options import EngineOptions
from engine.session import RoundStats, Session

last_stats = RoundStats()  # of the latest call in this process, for benchmarks


def transcribe_audio(audio: np.ndarray, *, model_name: str | None = None, options: EngineOptions = EngineOptions()):
    """Transcribe one float32 16 kHz mono signal."""
    return transcribe_many([audio], model_name=model_name, options=options)[0]


def transcribe_file(path: str | Path, *, model_name: str | None = None, options: EngineOptions = EngineOptions()):
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
    min_region_s: float | None = None,
    on_done=None,
) -> list:
    """Transcribe several files together; one Transcript per input, in order.

    A file that fails raises its error, or, with return_exceptions=True, puts it in its place
    while the others are transcribed. ``on_done(index, result)`` is called as each file finishes
    (progress bars). ``min_region_s``: see engine.session.MIN_REGION_S.
    """
    global last_stats
    kwargs = {} if min_region_s is None else {"min_region_s": min_region_s}
    session = Session(model_name, options=options, **kwargs)
    try:
        futures = [session.submit(item, options=options, key=i) for i, item in enumerate(audios_or_paths)]
        if on_done is not None:
            for i, f in enumerate(futures):
                f.add_done_callback(lambda f, i=i: on_done(i, f.exception() or f.result()))
        session.run_until_done(futures)
    finally:
        session.close()
        last_stats = session.stats
    out = []
    for f in futures:
        error = f.exception()
        if error is not None and not return_exceptions:
            raise error
        out.append(error if error is not None else f.result())
    return out
