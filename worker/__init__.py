"""Celery workers: the app (`celery -A worker ...`), tasks, embedded broker, reconciler, CLI commands.

Importing this package loads no model and starts no broker: both happen on first use.
"""

from worker.app import app

__all__ = ["app"]
