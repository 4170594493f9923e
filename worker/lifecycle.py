"""What a worker process starts beside its tasks, and stops when it shuts down: the periodic
reconciler (unless disabled), saving transcripts a dead predecessor spooled, and the engine
session with its lease keeper.

The session (the model) starts loading before Celery boots (``start_loading``, called by the
worker command), not at the first job: imports, CUDA's start and the weights take seconds, which
otherwise every fleet pays after its first enqueue instead of while it waits, and Celery's own
start (broker connection, consumers) overlaps them. A model that cannot load is logged here and
fails each job that asks for it, as before."""

from __future__ import annotations

import json
import logging
import threading
import time

from celery import signals

from worker import config, engine_host

log = logging.getLogger(__name__)

_threads: list = []


@signals.worker_ready.connect
def _start_background(sender=None, **_kwargs) -> None:
    """Every worker runs the reconciler; a Redis lock lets one of the fleet act per interval."""
    from worker.saving import flush_spool
    from worker.tasks import worker_identity

    try:
        saved = flush_spool(worker_identity(getattr(sender, "hostname", None)))
        if saved:
            log.info("saved %d spooled transcript(s)", saved)
    except Exception as e:  # the database may be away: the spool waits for the next start
        log.warning("could not save spooled transcripts yet: %s", str(e).splitlines()[0])
    if config.current().reconcile:
        from worker.reconcile import ReconcileThread

        reconciler = ReconcileThread()
        reconciler.start()
        _threads.append(reconciler)


def start_loading() -> None:
    """Load the configured model in the background (a job that arrives first waits for it)."""
    if config.current().model:
        threading.Thread(target=_load_session, name="load-model", daemon=True).start()


def _load_session() -> None:
    cfg = config.current()
    began = time.monotonic()
    try:
        engine_host.session(cfg.model, cfg.batch_size)
        log.info("start-up: model %s loaded and its session ready in %.2f s", cfg.model, time.monotonic() - began)
    except Exception as e:  # the first job asking for the model meets the error again and records it
        log.warning("could not load model %s at start-up: %s", cfg.model, str(e).splitlines()[0] if str(e) else type(e).__name__)


@signals.worker_shutdown.connect
def _stop_background(sender=None, **_kwargs) -> None:
    for thread in _threads:
        thread.stop()
    for thread in _threads:
        thread.join(timeout=2)
    log.info("worker totals: %s", json.dumps(engine_host.totals()))
    engine_host.stop_keeper()
    engine_host.stop_session()
