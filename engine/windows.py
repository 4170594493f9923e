"""Cutting one file's log-mel into regions and 30 s windows.

A file is split at its quietest points into regions; each region is decoded the way sequential
Whisper decodes a whole file: a window of up to 30 s from the seek point, then seek to the last
timestamp Whisper produced (it stops early when it expects the next window to start there) or
past the window. All regions, of all files, advance together as the rows of a batch, so a region
join is the only place the batched engine differs from sequential Whisper, and it falls where
nobody speaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_whisper.audio import FRAMES_PER_SECOND, N_FRAMES

QUIET_SPAN_FRAMES = 30  # 0.3 s: the quietness of a cut point is the mean energy around it
MIN_WINDOW_FRAMES = 10  # 0.1 s: a region's tail shorter than this holds no word; not decoded


@dataclass(frozen=True)
class Region:
    """A stretch of one file decoded like a file of its own (frames of the log-mel, 10 ms each)."""

    file_index: int
    start_frame: int
    end_frame: int  # exclusive


def frame_energy(mel: mx.array) -> np.ndarray:
    """(n_frames, n_mels) log-mel -> (n_frames,) loudness, the mean over the mel bands."""
    return np.array(mx.mean(mel, axis=1))


def plan_regions(energy: np.ndarray, *, file_index: int, region_s: float, search_s: float) -> list[Region]:
    """Cut a file into regions of about ``region_s`` seconds, each boundary at the quietest 0.3 s
    within ``search_s`` of its planned place, measured from the previous cut (so a region is never
    longer than region_s + search_s)."""
    n_frames = len(energy)
    if n_frames == 0:
        return []
    target = int(region_s * FRAMES_PER_SECOND)
    search = int(min(search_s, region_s / 2) * FRAMES_PER_SECOND)
    smooth = np.convolve(energy, np.ones(QUIET_SPAN_FRAMES) / QUIET_SPAN_FRAMES, mode="same")
    cuts = [0]
    while n_frames - cuts[-1] > target + search:
        lo, hi = cuts[-1] + target - search, cuts[-1] + target + search
        cuts.append(lo + int(np.argmin(smooth[lo:hi])))
    cuts.append(n_frames)
    return [Region(file_index, a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def window_mel(mel: mx.array | np.ndarray, seek: int, end_frame: int) -> tuple[mx.array, int]:
    """The window at ``seek``: (N_FRAMES, n_mels) log-mel, zero-padded as mlx_whisper's pad_or_trim
    pads it, and the number of real frames in it. ``mel`` may be held in host memory (numpy): only
    the window goes to the device."""
    size = min(N_FRAMES, end_frame - seek)
    window = mx.array(mel[seek : seek + size])
    if size < N_FRAMES:
        window = mx.pad(window, [(0, N_FRAMES - size), (0, 0)])
    return window, size
