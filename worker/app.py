"""The Celery app: settings for long jobs on Redis/Valkey, one queue per model.

The database is the source of truth (see worker.tasks); the broker only carries "look at job N"
messages. So the settings favour never losing a message over never duplicating one: a duplicate
is a harmless no-op, a lost message is found again by worker.reconcile.
"""

from __future__ import annotations

import hashlib
import re

from celery import Celery

TASK_NAME = "archive_asr.transcribe"
QUEUE_PREFIX = "asr."
# A message a worker took but never acknowledged goes back to the queue only after this long.
# It must exceed the longest job (a 6-hour file on a slow CPU), or a job still running would be
# redelivered; it is only a backstop: a dead worker's job comes back through its lease (reconcile).
VISIBILITY_TIMEOUT_S = 48 * 3600
# Redis has no native priorities: kombu keeps one list per step and pops lower steps first.
PRIORITY_STEPS = list(range(10))
DEFAULT_PRIORITY_STEP = 5  # a job of priority 0; each point of job priority is one step sooner


def queue_for_model(model: str) -> str:
    """The queue a model's jobs go to: "asr.tiny.en", "asr.base"; a folder or repo id gets a short hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model.rstrip("/").rsplit("/", 1)[-1]).strip("._") or "model"
    if safe != model:  # folders and hub ids: keep two "whisper-small" from different places apart
        safe = f"{safe[:60]}-{hashlib.sha1(model.encode()).hexdigest()[:8]}"
    return QUEUE_PREFIX + safe


def message_priority(job_priority: int) -> int:
    """Job priority (higher = sooner, any integer) -> kombu's Redis step (0 = first)."""
    return max(PRIORITY_STEPS[0], min(PRIORITY_STEPS[-1], DEFAULT_PRIORITY_STEP - int(job_priority)))


def _config() -> dict:
    # Evaluated on first use of app.conf, not at import: the embedded broker starts only when a
    # process actually talks to the broker, and importing worker.dispatch stays cheap.
    from archive_asr.settings import get_settings
    from worker.broker import broker_url

    settings = get_settings()
    return {
        "broker_url": broker_url(),
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "broker_transport_options": {
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "priority",
            "socket_connect_timeout": 5,
            "health_check_interval": 10,
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,  # results live in the database; Flower reads them from events
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        # A lost broker connection must not abandon a job mid-file: the job's lease, not the
        # message, says who owns it, and a redelivered message for a finished job is a no-op.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_default_queue": queue_for_model(settings.model),
        "task_default_priority": DEFAULT_PRIORITY_STEP,
        "task_create_missing_queues": True,
        "task_track_started": True,
        "task_send_sent_event": True,  # Flower shows queued tasks with their file and duration
        "worker_send_task_events": True,  # the same as `celery worker -E`
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2},
        "timezone": "UTC",
    }


app = Celery("archive_asr", include=["worker.tasks", "worker.lifecycle"])
app.add_defaults(_config)
