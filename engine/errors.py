"""The engine's errors, in archive_asr.errors' tree, so a worker knows which a retry can fix:
an EngineError is permanent (the same job would fail the same way again); BatchFailed is not.
"""

from archive_asr.errors import PermanentError, RetryableError


class EngineError(PermanentError):
    """Raised when the engine cannot transcribe a file, for a reason a retry will not change."""


class AudioDecodeError(EngineError):
    """Raised when a file cannot be decoded to audio: not audio, empty, or damaged beyond its first frame."""


class ModelError(EngineError):
    """Raised when a model cannot be found, downloaded, converted, verified or loaded."""


class UnsupportedLanguage(EngineError, ValueError):
    """Raised when a model is asked for a language it cannot transcribe (English-only models)."""


class BatchFailed(RetryableError):
    """Raised for every file of a batch round that failed as a whole (out of memory, a device
    fault): transient, and a retried job runs alone, so the culprit is found."""
