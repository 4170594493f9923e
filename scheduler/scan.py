"""Walk folders for audio files: recursive, symlinks followed, loops survived, problems reported.

Paths are handled as bytes (what the file system stores), so names that are not valid UTF-8
reach the database unchanged.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from models.base import display_path

# Containers ffmpeg/PyAV read that archives hold audio in (video containers too: their audio track).
AUDIO_EXTENSIONS = frozenset(
    """wav wave flac mp3 mp2 m4a m4b aac ogg oga opus spx webm mp4 m4v mka mkv mov wma wmv asf
    aif aiff aifc amr awb 3gp 3g2 caf au snd ac3 eac3 dts ape wv tta mpc ra rm voc w64 rf64 avi
    mpg mpeg ts flv""".split()
)


@dataclass(frozen=True)
class Found:
    """An audio file to enqueue, as stat saw it."""

    path_bytes: bytes
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    """A path that could not be enqueued, with the reason a person can act on."""

    path_bytes: bytes
    reason: str
    missing: bool = False  # a path named by the caller that does not exist (a command-line error)

    @property
    def path(self) -> str:
        return display_path(self.path_bytes)


def is_audio_name(name: bytes) -> bool:
    _, dot, ext = name.rpartition(b".")
    return bool(dot) and ext.decode("ascii", "replace").lower() in AUDIO_EXTENSIONS


def _matches(path_bytes: bytes, patterns: tuple[str, ...]) -> bool:
    """Globs match the file name or the whole path (`*.wav`, `*/raw/*`), case-sensitively."""
    path = os.fsdecode(path_bytes)
    name = os.path.basename(path)
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(path, p) for p in patterns)


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


class Scanner:
    """Yields Found and Skipped entries for the given paths; counts what it passed over."""

    def __init__(self, *, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> None:
        self.include = include
        self.exclude = exclude
        self.not_audio = 0  # files without an audio extension (not reported one by one)
        self.excluded = 0  # audio files left out by --include/--exclude
        self._seen_dirs: set[tuple[int, int]] = set()
        self._seen_files: set[tuple[int, int]] = set()

    def scan(self, paths: list[str | bytes]) -> Iterator[Found | Skipped]:
        for raw in paths:
            path = os.path.abspath(os.fsencode(raw))
            try:
                st = os.stat(path)
            except FileNotFoundError:
                reason = "broken symlink" if os.path.islink(path) else "no such file or directory"
                yield Skipped(path, reason, missing=True)
                continue
            except OSError as e:
                yield Skipped(path, _reason(e))
                continue
            if stat.S_ISDIR(st.st_mode):
                yield from self._walk(path, st)
            else:
                # A file named on the command line is taken even without an audio extension
                # only if it has one; say so rather than silently doing nothing.
                if not is_audio_name(os.path.basename(path)):
                    yield Skipped(path, "not an audio file name (extension not in the audio list)")
                    continue
                yield from self._file(path, st)

    def _file(self, path: bytes, st: os.stat_result) -> Iterator[Found | Skipped]:
        if not stat.S_ISREG(st.st_mode):
            yield Skipped(path, "not a regular file")
            return
        if self.include and not _matches(path, self.include) or self.exclude and _matches(path, self.exclude):
            self.excluded += 1
            return
        # The same file reached twice (a symlink to it, a folder named twice): enqueue it once.
        if (st.st_dev, st.st_ino) in self._seen_files:
            return
        self._seen_files.add((st.st_dev, st.st_ino))
        if not os.access(path, os.R_OK):
            yield Skipped(path, "permission denied (not readable)")
            return
        yield Found(path, st.st_size, st.st_mtime_ns)

    def _walk(self, top: bytes, top_st: os.stat_result) -> Iterator[Found | Skipped]:
        # Iterative, so deep trees don't hit the recursion limit; (st_dev, st_ino) of every
        # folder entered stops symlink loops and folders reached twice.
        stack = [(top, top_st)]
        while stack:
            folder, st = stack.pop()
            key = (st.st_dev, st.st_ino)
            if key in self._seen_dirs:
                continue
            self._seen_dirs.add(key)
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                yield Skipped(folder, f"cannot list folder: {_reason(e)}")
                continue
            subfolders = []
            for entry in entries:
                try:
                    is_dir = entry.is_dir()  # follows symlinks
                except OSError:
                    is_dir = False
                if is_dir:
                    try:
                        subfolders.append((entry.path, entry.stat()))
                    except OSError as e:
                        yield Skipped(entry.path, f"cannot open folder: {_reason(e)}")
                    continue
                if not is_audio_name(entry.name):
                    self.not_audio += 1
                    continue
                try:
                    entry_st = entry.stat()  # follows symlinks
                except FileNotFoundError:
                    yield Skipped(entry.path, "broken symlink" if entry.is_symlink() else "vanished during the scan")
                    continue
                except OSError as e:
                    yield Skipped(entry.path, _reason(e))
                    continue
                yield from self._file(entry.path, entry_st)
            stack.extend(reversed(subfolders))
