"""The error tree shared by the scheduler and the workers.

Workers record these on the job instead of printing and carrying on: a RetryableError puts the
job back in the queue (up to the attempt cap), a PermanentError fails it with its message.
"""


class ArchiveAsrError(Exception):
    """Base of every error archive-asr raises on purpose."""


class ConfigError(ArchiveAsrError):
    """Raised when the settings are missing or malformed."""


class RetryableError(ArchiveAsrError):
    """Raised when a job failed for a reason that may pass: database or broker unreachable."""


class PermanentError(ArchiveAsrError):
    """Raised when a job can never succeed as it is: undecodable audio, a model that can't serve it."""


class DatabaseUnavailable(RetryableError):
    """Raised when the database does not answer."""


class BrokerUnavailable(RetryableError):
    """Raised when the Celery broker does not answer or the embedded one cannot start."""
