"""archive-asr: shared settings and errors for the scheduler, the workers and the engine's callers."""

__version__ = "0.1.0"
