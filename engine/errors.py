"""Errors the engine raises on purpose; both are permanent: retrying the same job cannot help."""

from archive_asr.errors import PermanentError


class AudioDecodeError(PermanentError):
    """Raised when a file cannot be decoded to audio: not audio, empty, or damaged beyond its first frame."""


class ModelError(PermanentError):
    """Raised when a model cannot be found, downloaded, converted, verified or loaded."""
