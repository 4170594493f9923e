"""The engine session of this worker process, the thread that drives it, and the leases of the
jobs it holds.

A worker process holds one model and one engine.session.Session. Celery runs the tasks in threads
(as many as the batch has rows, plus a small prefetch); each task claims its job, submits the
file here and waits for its own Future, so the session always has files to refill its rows with.
One driver thread runs the session's rounds. One lease keeper renews every in-flight job's lease
in a single transaction, so a killed worker's jobs all come back through the reconciler.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

_lock = threading.Lock()
_session = None
_driver: threading.Thread | None = None
_stop = threading.Event()


def session(model: str, batch_size: int):
    """This process's session for ``model``, started on first use (the model loads then, never
    at import or in a fork hook). A job of another model waits until the current session is idle,
    then the model is swapped (a process never holds two)."""
    global _session, _driver
    with _lock:
        if _session is not None and _session.loaded.name != model:
            while _session.busy():
                _session.wait_for_work(timeout_s=1.0)
            stop_session()
        if _session is None:
            ready: dict = {}
            started = threading.Event()
            _stop.clear()
            _driver = threading.Thread(
                target=_drive, args=(model, batch_size, ready, started), name="engine-driver", daemon=True
            )
            _driver.start()
            started.wait()
            if "error" in ready:
                _driver = None
                raise ready["error"]
            _session = ready["session"]
            log.info("engine session: model %s, %d rows, %s", model, _session.batch_size, _session.device)
        return _session


def _drive(model: str, batch_size: int, ready: dict, started: threading.Event) -> None:
    """The driver thread: builds the session (MLX streams belong to the thread that makes them,
    so the model is loaded here) and runs its rounds until stopped."""
    try:
        import engine  # noqa: F401  (OpenBLAS before MLX)
        from engine.session import SPLIT_GRACE_S, Session

        from archive_asr.settings import get_settings

        s = Session(model, batch_size=batch_size, min_region_s=get_settings().min_region_s or None)
        s.split_grace_s = SPLIT_GRACE_S  # the next jobs may be on their way
        s.warm_up()  # compile before taking jobs, not mid-round (Session.warm_up says why)
    except BaseException as e:
        ready["error"] = e
        started.set()
        return
    ready["session"] = s
    started.set()
    s.serve(_stop)


def stop_session() -> None:
    global _session, _driver
    if _session is None:
        return
    _stop.set()
    if _driver is not None:
        _driver.join(timeout=30)
    _session.close()
    _session, _driver = None, None


_db = {"s": 0.0, "jobs": 0}
_lock_db = threading.Lock()


def count_db(seconds: float) -> None:
    """Time a task spent on the database (claiming, saving, recording a failure)."""
    with _lock_db:
        _db["s"] += seconds
        _db["jobs"] += 1


def totals() -> dict:
    """Where this worker's time went, for its log at shutdown (benchmarks/bench_run.py reads it)."""
    out = {"database_s": round(_db["s"], 3)}
    if _session is not None:
        st = _session.stats
        out |= {
            "files": st.files,
            "audio_s": round(st.audio_s, 2),
            "rows": _session.batch_size,
            "rounds": st.rounds,
            "windows": st.windows,
            "redecoded": st.redecoded,  # windows decoded again hotter (temperature fallback)
            "idle_rows": st.idle_rows,  # rows left empty, summed over rounds
            "starved_rows": st.starved_rows,  # of those, while files were still being prepared
            "live_rows": st.live_rows,  # rows run in each round: the ramp at the start, the tail at the end
            "round_start_ms": st.round_start_ms,  # each round's start after the first round's
            "round_ms": st.round_ms,  # each round's time on the device
            "round_encode_ms": st.round_encode_ms,  # of which encoding
            "round_words_ms": st.round_words_ms,  # and word timings
            "splits": st.splits,
            "device_s": round(st.device_s, 3),
            "encode_s": round(st.encode_s, 3),
            "decode_s": round(st.decode_s, 3),
            "words_s": round(st.words_s, 3),
            "idle_s": round(st.idle_s, 3),
            "read_s": round(st.read_s, 3),
            "audio_decode_s": round(st.prepare_decode_s, 3),
            "mel_s": round(st.prepare_mel_s, 3),
        }
    return out


class LeaseKeeper(threading.Thread):
    """Renews the leases of every job this process holds, every lease_s / 3, in one transaction."""

    def __init__(self, holder: str, lease_s: float):
        super().__init__(name="lease-keeper", daemon=True)
        self.holder = holder
        self.lease_s = lease_s
        self._jobs: set[int] = set()
        self.lost: set[int] = set()
        self._guard = threading.Lock()
        self._stop_event = threading.Event()

    def hold(self, job_id: int) -> None:
        with self._guard:
            self._jobs.add(job_id)
            self.lost.discard(job_id)

    def release(self, job_id: int) -> None:
        with self._guard:
            self._jobs.discard(job_id)

    def run(self) -> None:
        from models.db import session_scope
        from models.jobs import renew_lease

        while not self._stop_event.wait(self.lease_s / 3):
            with self._guard:
                held = sorted(self._jobs - self.lost)
            if not held:
                continue
            try:
                with session_scope() as s:
                    for job_id in held:
                        if not renew_lease(session=s, job_id=job_id, worker_host=self.holder, lease_s=self.lease_s):
                            with self._guard:
                                if job_id not in self._jobs:
                                    continue  # finished and released since `held` was taken: not lost
                                self.lost.add(job_id)
                            log.warning("job %s: lease lost (taken back by the reconciler)", job_id)
            except Exception as e:  # keep trying: the lease has lease_s of slack
                log.warning("could not renew the leases of %d job(s): %s", len(held), str(e).splitlines()[0])

    def stop(self) -> None:
        self._stop_event.set()


_keeper: LeaseKeeper | None = None


def lease_keeper(holder: str, lease_s: float) -> LeaseKeeper:
    """The process's lease keeper (one per worker process; ``holder`` names this process)."""
    global _keeper
    with _lock:
        if _keeper is None or _keeper.holder != holder:
            if _keeper is not None:
                _keeper.stop()
            _keeper = LeaseKeeper(holder, lease_s)
            _keeper.start()
        return _keeper


def stop_keeper() -> None:
    global _keeper
    if _keeper is not None:
        _keeper.stop()
        _keeper = None
