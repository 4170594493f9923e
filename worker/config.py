"""What the `worker` command decides for the tasks of its process: one typed object, set once
before Celery starts (tasks run in threads of that same process)."""

from __future__ import annotations

from dataclasses import dataclass, replace

REQUEUE_BACKOFF_S = (5, 30, 120)  # countdown before a transient failure's next attempt, by attempt
PREFETCH_JOBS = 2  # jobs held beyond the batch rows at least, prepared while the rows decode


def default_prefetch(rows: int) -> int:
    """Jobs held beyond the batch rows, their audio decoded while the rows run: a quarter of the
    rows, at least PREFETCH_JOBS.

    Several rows free up each round (on an H100, 64 rows of 1.5- to 5-minute files free about ten
    a round) and a row whose next file is still being claimed and decoded idles a whole round
    (1.8 s there). Holding 2 left 23 % of the row-rounds idle in the fleet drill's one-worker
    phase (803 of 3,520), where the engine alone, every file ready, left about 4 %.
    """
    return max(PREFETCH_JOBS, rows // 4)


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
