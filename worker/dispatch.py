"""Put jobs on the broker: one small message per job, on its model's queue, at its priority.

Used by the CLI (cli.dispatch: `archive-asr enqueue`, `retry`, `run`), the reconciler and the task;
it imports no MLX and no worker machinery beyond the Celery app.

Each message is mirrored by a *dispatch marker*: a field in one Redis hash (job id -> queue and
time), written just before the message and deleted by the task that receives it. The marker lives
in the broker beside the messages, so it disappears exactly when they do (a broker restarted empty,
a FLUSHALL): the reconciler re-dispatches every queued job that has no marker, and never
duplicates one whose message is merely waiting in a long queue. See worker.reconcile.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis
from kombu import Queue
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import select

from archive_asr.errors import BrokerUnavailable
from worker.app import TASK_NAME, app, message_priority, queue_for_model
from worker.broker import broker_url, client, ping, redacted


MARKERS_KEY = "archive-asr:dispatched"  # hash: job id -> "<queue> <unix time>"
CHUNK = 500  # jobs per database read and per Redis pipeline


@dataclass(frozen=True)
class JobMessage:
    """What a message says about its job; the task re-reads the job row anyway."""

    job_id: int
    path: str
    duration_s: float | None
    model: str
    priority: int

    @property
    def queue(self) -> str:
        return queue_for_model(self.model)


def _load(job_ids: Sequence[int]) -> list[JobMessage]:
    from models.db import session_scope
    from models.tables import Job, JobStatus

    out: list[JobMessage] = []
    with session_scope() as session:
        for i in range(0, len(job_ids), CHUNK):
            rows = session.execute(
                select(Job.id, Job.path, Job.duration_s, Job.model, Job.priority).where(
                    Job.id.in_(job_ids[i : i + CHUNK]), Job.status == JobStatus.QUEUED
                )
            ).all()
            out += [JobMessage(r.id, r.path, r.duration_s, r.model, r.priority) for r in rows]
    return out


def _mark_dispatched(job_ids: list[int]) -> None:
    from models.db import session_scope
    from models.jobs import mark_dispatched

    with session_scope() as session:
        for i in range(0, len(job_ids), CHUNK):
            mark_dispatched(session=session, job_ids=job_ids[i : i + CHUNK])


def publish(messages: Iterable[JobMessage], *, countdown: float | None = None) -> int:
    """Send one task message per job (no database access); return how many were sent."""
    # Longest first (within a priority, the broker keeps this order): a worker's rows decode a
    # file's windows one after another, so a long file taken last is a tail its other rows idle
    # through, and in a fleet it keeps one worker busy after the others are done.
    messages = sorted(messages, key=lambda m: -(m.duration_s or 0.0))
    if not messages:
        return 0
    url = broker_url()
    ping(url)
    markers = client(url)
    sent = 0
    try:
        # The URL from settings, not the one app.conf froze at first use: a process whose settings
        # change (tests; a scheduler pointed at another fleet) publishes where it marks.
        with app.connection_for_write(url) as conn:
            producer = app.amqp.Producer(conn, auto_declare=False)
            channel = conn.default_channel
            # Declared on every call, not cached: a flushed broker forgets kombu's bindings, and a
            # message published through a missing binding would be dropped as undeliverable.
            for name in sorted({m.queue for m in messages}):
                Queue(name, routing_key=name).bind(channel).declare()
            for i in range(0, len(messages), CHUNK):
                chunk = messages[i : i + CHUNK]
                now = time.time()
                markers.hset(MARKERS_KEY, mapping={str(m.job_id): f"{m.queue} {now:.3f}" for m in chunk})
                for m in chunk:
                    app.send_task(
                        TASK_NAME,
                        args=([m.job_id],),
                        # Not needed by the task (it reads the job row); there so Flower shows them.
                        # the file's name first: Flower's Tasks list cuts a long cell short
                        kwargs={"file": os.path.basename(m.path), "duration_s": m.duration_s, "path": m.path, "model": m.model},
                        queue=m.queue,
                        routing_key=m.queue,
                        priority=message_priority(m.priority),
                        countdown=countdown,
                        producer=producer,
                    )
                    sent += 1
    except (KombuOperationalError, redis.RedisError, OSError) as e:
        unsent = [str(m.job_id) for m in messages[sent:]]
        try:
            if unsent:
                markers.hdel(MARKERS_KEY, *unsent)
        except redis.RedisError:
            pass  # the reconciler's empty-queue check re-dispatches jobs whose marker outlived its message
        raise BrokerUnavailable(f"lost the broker at {redacted(url)} after {sent} messages: {e}") from e
    return sent


def dispatch_jobs(job_ids: Sequence[int], *, countdown: float | None = None) -> int:
    """Send tasks for these jobs if they are still queued; record dispatched_at. Returns the count sent."""
    messages = _load(list(job_ids))
    sent = publish(messages, countdown=countdown)
    _mark_dispatched([m.job_id for m in messages])
    return sent


def forget(job_ids: Iterable[int], url: str | None = None) -> None:
    """Drop the markers of messages a task has received (their job is in the task's hands now)."""
    ids = [str(i) for i in job_ids]
    if ids:
        client(url).hdel(MARKERS_KEY, *ids)
