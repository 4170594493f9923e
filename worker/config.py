"""What the `worker` command decides for the tasks of its process: one typed object, set once
before Celery starts (tasks run in threads of that same process)."""

from __future__ import annotations

from dataclasses import dataclass, replace

REQUEUE_BACKOFF_S = (5, 30, 120)  # countdown before a transient failure's next attempt, by attempt
PREFETCH_JOBS = 2  # jobs held beyond the batch rows, prepared while the rows decode


@dataclass(frozen=True)
class WorkerConfig:
    batch_size: int = 0  # batch rows of the engine session; 0 = from the device's memory
    model: str | None = None  # the model this worker serves (its session loads it at start-up)
    reconcile: bool = True  # run the periodic reconciler in this worker


_current = WorkerConfig()


def configure(**changes) -> WorkerConfig:
    global _current
    _current = replace(_current, **changes)
    return _current


def current() -> WorkerConfig:
    return _current
