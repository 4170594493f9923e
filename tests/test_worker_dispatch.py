"""Dispatch and reconcile against the real Redis and a real SQLite database, without workers.

Each test has its own Redis database number, so tests and earlier runs don't see each other's messages.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tests.fixtures_worker import SHORT_CLIPS, clean_redis, copy_clips, enqueue, worker_env

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def env(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = redis_url.rsplit("/", 1)[0] + "/8"
    clean_redis(url)
    worker_env(monkeypatch, tmp_path / "data", url)
    yield url
    clean_redis(url)


def _queue(url: str) -> list[int]:
    """Job ids of the messages waiting in the tiny.en queue, all priority steps."""
    import base64
    import json

    r = redis.Redis.from_url(url)
    ids = []
    for key in r.scan_iter(match="asr.tiny.en*"):
        if r.type(key) != b"list":
            continue
        for raw in r.lrange(key, 0, -1):
            body = json.loads(base64.b64decode(json.loads(raw)["body"]))
            ids += body[0][0]
    return sorted(ids)


def test_messages_are_not_duplicated_while_they_wait(env: str, shared_audio: Path, tmp_path: Path):
    from worker.reconcile import reconcile

    ids = enqueue(copy_clips(shared_audio, tmp_path / "audio", SHORT_CLIPS[:3]))
    assert len(ids) == 3 and _queue(env) == sorted(ids)
    report = reconcile(force=True, grace=0)
    assert report.redispatched == [] and _queue(env) == sorted(ids)


def test_flushed_broker_gets_its_messages_back(env: str, shared_audio: Path, tmp_path: Path):
    from worker.reconcile import reconcile

    ids = enqueue(copy_clips(shared_audio, tmp_path / "audio", SHORT_CLIPS[:3]))
    redis.Redis.from_url(env).flushdb()  # the broker restarted empty
    assert _queue(env) == []
    report = reconcile(force=True, grace=0)
    assert sorted(report.redispatched) == sorted(ids)
    assert _queue(env) == sorted(ids)
    # A second pass finds nothing missing.
    assert reconcile(force=True, grace=0).redispatched == []
    assert _queue(env) == sorted(ids)


def test_young_jobs_are_left_to_their_dispatcher(env: str, shared_audio: Path, tmp_path: Path):
    from worker.reconcile import reconcile

    ids = enqueue(copy_clips(shared_audio, tmp_path / "audio", SHORT_CLIPS[:2]))
    redis.Redis.from_url(env).flushdb()
    assert reconcile(force=True, grace=60).redispatched == []  # within the grace period
    assert sorted(reconcile(force=True, grace=0).redispatched) == sorted(ids)


def test_expired_lease_is_released_and_dispatched(env: str, shared_audio: Path, tmp_path: Path):
    import time

    from models.db import session_scope
    from models.jobs import claim_job, start_attempt
    from models.tables import Job, JobStatus
    from worker.dispatch import forget
    from worker.reconcile import reconcile

    [job_id] = enqueue(copy_clips(shared_audio, tmp_path / "audio", SHORT_CLIPS[:1]))
    redis.Redis.from_url(env).delete("asr.tiny.en", *redis.Redis.from_url(env).keys("asr.tiny.en*"))
    forget([job_id])  # as a worker does when it takes the message
    with session_scope() as session:
        assert claim_job(session=session, job_id=job_id, worker_host="gone:1", lease_s=0.2)
        assert start_attempt(session=session, job_id=job_id, worker_host="gone:1")  # it began the file
    time.sleep(0.5)  # the worker died: no renewals
    report = reconcile(force=True, grace=0)
    assert report.released == [job_id] and report.redispatched == [job_id]
    assert _queue(env) == [job_id]
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.QUEUED and job.attempts == 1
        assert "stopped renewing its lease" in job.error


def test_priority_picks_the_redis_step(env: str, shared_audio: Path, tmp_path: Path):
    from scheduler.enqueue import Enqueuer, job_spec
    from worker.dispatch import dispatch_jobs

    clips = copy_clips(shared_audio, tmp_path / "audio", SHORT_CLIPS[:2])
    low = Enqueuer(spec=job_spec(model="tiny.en", language=None, word_timestamps=True, priority=0)).run([str(clips[0])])
    high = Enqueuer(spec=job_spec(model="tiny.en", language=None, word_timestamps=True, priority=5)).run([str(clips[1])])
    dispatch_jobs(low.new_jobs + high.new_jobs)
    r = redis.Redis.from_url(env)
    assert r.llen("asr.tiny.en") == 1  # priority 5: step 0, popped first
    assert r.llen("asr.tiny.en\x06\x165") == 1  # priority 0: the middle step


def test_unreachable_broker_is_a_clear_error(data_dir: Path, monkeypatch: pytest.MonkeyPatch, shared_audio: Path, tmp_path: Path):
    from archive_asr.errors import BrokerUnavailable
    from archive_asr.settings import get_settings
    from scheduler.enqueue import Enqueuer, job_spec
    from worker.dispatch import dispatch_jobs

    monkeypatch.setenv("ARCHIVE_ASR_BROKER_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    clips = copy_clips(shared_audio, tmp_path / "audio", SHORT_CLIPS[:1])
    summary = Enqueuer(spec=job_spec(model="tiny.en", language=None, word_timestamps=True, priority=0)).run([str(clips[0])])
    with pytest.raises(BrokerUnavailable, match="does not answer.*ARCHIVE_ASR_BROKER_URL"):
        dispatch_jobs(summary.new_jobs)


def test_queue_names_are_per_model():
    from worker.app import queue_for_model

    assert queue_for_model("tiny.en") == "asr.tiny.en"
    assert queue_for_model("base") == "asr.base"
    a, b = queue_for_model("/models/a/whisper-small"), queue_for_model("/models/b/whisper-small")
    assert a != b and a.startswith("asr.whisper-small-")
    assert queue_for_model("mlx-community/whisper-large-v3-mlx").startswith("asr.whisper-large-v3-mlx-")


def test_released_job_with_a_waiting_message_is_not_sent_twice(env: str, shared_audio: Path, tmp_path: Path):
    """A short job claimed along with another keeps its own message; if its worker dies, that
    message (still in the queue) is enough."""
    import time

    from models.db import session_scope
    from models.jobs import claim_job
    from worker.reconcile import reconcile

    first, second = enqueue(copy_clips(shared_audio, tmp_path / "audio", SHORT_CLIPS[:2]))
    with session_scope() as session:  # a worker took `first`'s message... and claimed `second` too
        assert claim_job(session=session, job_id=second, worker_host="gone:1", lease_s=0.2)
    time.sleep(0.5)
    report = reconcile(force=True, grace=0)
    assert report.released == [second] and report.redispatched == []
    assert _queue(env) == sorted([first, second])  # one message each, as before


def test_longest_files_are_taken_first(env: str, shared_audio: Path, tmp_path: Path):
    """A long file taken last is a tail a worker's other rows idle through: the queue hands out the longest first."""
    import base64
    import json

    from sqlalchemy import select

    from models.db import session_scope
    from models.tables import Job

    ids = enqueue(copy_clips(shared_audio, tmp_path / "audio", SHORT_CLIPS))
    r = redis.Redis.from_url(env)
    (key,) = [k for k in r.scan_iter(match="asr.tiny.en*") if r.type(k) == b"list"]
    # kombu pushes on the left and workers pop on the right: the consuming order is the list reversed
    taken = [json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0][0] for raw in reversed(r.lrange(key, 0, -1))]
    with session_scope() as session:
        duration = dict(session.execute(select(Job.id, Job.duration_s).where(Job.id.in_(ids))).all())
    assert sorted(taken) == sorted(ids)
    seconds = [duration[i] for i in taken]
    assert seconds == sorted(seconds, reverse=True) and seconds[0] > seconds[-1]


def test_a_message_taken_while_the_reconciler_looks_is_not_sent_again(
    env: str, shared_audio: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A worker drops a message's marker and then claims its job. When that happens just as the
    reconciler reads the markers, the job is not "lost": it must not get a second message."""
    from models.db import session_scope
    from models.jobs import claim_job
    from worker.dispatch import MARKERS_KEY, forget
    from worker.reconcile import reconcile

    first, second = enqueue(copy_clips(shared_audio, tmp_path / "audio", SHORT_CLIPS[:2]))
    real_hgetall = redis.Redis.hgetall

    def worker_takes_first_meanwhile(self, name):
        if name == MARKERS_KEY:  # a worker receives `first`'s message and claims its job
            forget([first])
            with session_scope() as session:
                assert claim_job(session=session, job_id=first, worker_host="busy:1", lease_s=60)
        return real_hgetall(self, name)

    monkeypatch.setattr(redis.Redis, "hgetall", worker_takes_first_meanwhile)
    report = reconcile(force=True, grace=0)
    assert report.redispatched == [], report
    assert _queue(env) == sorted([first, second])  # one message each, as the enqueue sent them
