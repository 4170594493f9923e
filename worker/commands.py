"""CLI commands for the queue: worker, reconcile, broker, flower (added to the root group by `cli`)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import time

import click

from archive_asr.errors import ArchiveAsrError, ConfigError
from archive_asr.settings import get_settings
from worker.cli_options import parse_batch_size
from worker.config import PREFETCH_JOBS, default_prefetch


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e))


def node_name(*, model: str, device_tag: str, pid: int) -> str:
    """The Celery node name (Flower's worker name): model, device and pid, e.g. `base-gpu1-1234@%h`."""
    from worker.app import queue_for_model

    return f"{queue_for_model(model).removeprefix('asr.')}-{device_tag}-{pid}@%h"


def worker_argv(*, model: str, concurrency: int, loglevel: str, device_tag: str) -> list[str]:
    """The `celery worker` arguments: one queue (one model), events on, tasks in threads.

    One process holds one model, one device and one engine session; its task threads (as many as
    the batch has rows, plus a prefetch) each wait for their own file while the session decodes
    them all together. Threads, never forks: MLX/Metal is not fork-safe, and rows share one device.
    """
    from worker.app import queue_for_model

    queue = queue_for_model(model)
    return [
        "worker",
        "-Q", queue,
        "-n", node_name(model=model, device_tag=device_tag, pid=os.getpid()),
        "-E",
        "--pool=threads",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]


def _wait_for_database() -> None:
    """A fleet worker may start before PostgreSQL: wait with backoff, saying so."""
    from models.db import get_engine

    delay = 1.0
    while True:
        try:
            get_engine()
            return
        except ConfigError:
            raise
        except ArchiveAsrError as e:
            click.echo(f"database unavailable: {e}; retrying in {delay:.0f} s (Ctrl-C to stop)", err=True)
            time.sleep(delay)
            delay = min(delay * 2, 30)


@click.command()
@click.option("--model", "-m", default=None, help="Whisper model this worker serves (default: ARCHIVE_ASR_MODEL).")
@click.option("--batch-size", default=None, help="Batch rows (files decoded together): 'auto' (from device memory) or a number.")
@click.option("--prefetch", type=click.IntRange(0, 256), default=None,
              help=f"Jobs held beyond the batch rows, decoded from disk while the rows run (default: a quarter of the rows, at least {PREFETCH_JOBS}).")
@click.option("--loglevel", "-l", default=None, help="Log level (default: ARCHIVE_ASR_LOG_LEVEL).")
@click.option("--reconcile/--no-reconcile", default=True, show_default=True,
              help="Also run the periodic reconciler (one per fleet acts at a time).")
@click.option("--device", default=None, metavar="auto|cpu|gpu|gpu:N",
              help="Device this worker computes on; gpu:N pins the N-th GPU (default: ARCHIVE_ASR_DEVICE, auto).")
@click.option("--per-gpu", is_flag=True,
              help="Start one worker process per GPU of this machine (one on the CPU if it has none) and wait for them.")
def worker(model: str | None, batch_size: str | None, prefetch: int | None, loglevel: str | None, reconcile: bool,
           device: str | None, per_gpu: bool) -> None:
    """Start a worker that transcribes one model's jobs from the queue, many files at once."""
    settings = get_settings()
    model = model or settings.model
    batch = parse_batch_size(batch_size) if batch_size is not None else settings.batch_size
    if per_gpu:
        if device is not None:
            raise click.ClickException("--per-gpu gives each worker its own GPU: leave out --device")
        args = ["--model", model, "--reconcile" if reconcile else "--no-reconcile"]
        args += ["--prefetch", str(prefetch)] if prefetch is not None else []
        args += ["--batch-size", batch_size] if batch_size is not None else []
        args += ["--loglevel", loglevel] if loglevel else []
        _supervise(args)
        return
    # The engine's device module imports no MLX: the card is pinned before anything loads MLX.
    from engine.device import apply, device_tag, parse_device, pin

    began = time.monotonic()
    try:
        choice = parse_device(device or settings.device)
        pin(choice)
        _wait_for_database()
        pinned = time.monotonic()
        apply(choice)
        from engine.holder import planned_rows
        from worker import config, lifecycle
        from worker.app import app

        rows = planned_rows(model, batch)
        planned = time.monotonic()
        config.configure(batch_size=rows, reconcile=reconcile, model=model)
        tag = device_tag()
        # Celery sets up logging only as it boots; until then, its format, so that the model's
        # start-up lines read like the rest of the worker's log
        logging.basicConfig(level=(loglevel or settings.log_level).upper(), format=app.conf.worker_log_format)
        # where a worker's start goes, for the benchmarks' timelines (the model's load is logged next)
        logging.getLogger(__name__).info(
            "start-up: device pinned and database reached %.2f s, MLX on the device and rows planned %.2f s",
            pinned - began, planned - pinned)
        lifecycle.start_loading()  # while Celery boots
    except ArchiveAsrError as e:
        raise _fail(e) from e
    code = 0
    try:
        held = rows + (prefetch if prefetch is not None else default_prefetch(rows))
        app.worker_main(worker_argv(model=model, concurrency=held, loglevel=loglevel or settings.log_level,
                                    device_tag=tag))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    _leave(code)


def _leave(code: int) -> None:
    """End the worker process without the interpreter's teardown.

    By now the warm shutdown is over: every finished job is saved, the engine session and its
    decoders are closed (worker.lifecycle). Running C++ static destructors after that once
    aborted a worker that had stopped cleanly ("terminate called without an active exception",
    exit status 134, in CI), which `--per-gpu` reports as a failed worker.
    """
    import logging
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _supervise(args: list[str]) -> None:
    from engine.device import count_gpus
    from worker.supervisor import supervise

    try:
        n = count_gpus()
    except ArchiveAsrError as e:
        raise _fail(e) from e
    devices = [f"gpu:{i}" for i in range(n)] or ["cpu"]
    click.echo(f"{n} GPU(s) here: starting {len(devices)} worker(s) on {', '.join(devices)}"
               + ("" if n else " (no GPU: one worker on the CPU)"), err=True)
    status = supervise(devices, args, echo=lambda line: click.echo(line, err=True))
    if status:
        raise SystemExit(status)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print each pass's result as JSON.")
@click.option("--every", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
              help="Keep running, one pass every SECONDS (for a box with no worker; workers reconcile anyway).")
def reconcile(as_json: bool, every: float | None) -> None:
    """Re-queue jobs whose worker died and re-send jobs whose broker message was lost."""
    from worker.reconcile import reconcile as run_reconcile

    while True:
        try:
            report = run_reconcile(force=every is None)
        except ArchiveAsrError as e:
            if every is None:
                raise _fail(e) from e
            click.echo(f"reconcile failed: {e}; trying again in {every:.0f} s", err=True)
        else:
            if as_json:
                click.echo(json.dumps(report.as_dict()))
            elif report or every is None:
                click.echo(
                    f"{len(report.released)} expired lease(s) re-queued, {len(report.failed)} failed at the attempt cap, "
                    f"{len(report.redispatched)} job(s) re-dispatched"
                )
        if every is None:
            return
        time.sleep(every)


# --- broker ------------------------------------------------------------------------------------------


@click.group()
def broker() -> None:
    """The embedded Valkey broker (used when ARCHIVE_ASR_BROKER_URL is not set)."""


def _queue_lengths() -> dict[str, int]:
    from worker.broker import client
    from worker.reconcile import KOMBU_PRIORITY_SEP, queue_length

    r = client()
    names = {k.decode().split(KOMBU_PRIORITY_SEP)[0] for k in r.scan_iter(match="asr.*", count=1000)}
    return {name: queue_length(r, name) for name in sorted(names)}


@broker.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def broker_status(as_json: bool) -> None:
    """Say whether the broker runs, where, and how many messages wait in each queue."""
    from worker import broker as b

    settings = get_settings()
    if settings.broker_url:
        status = {"embedded": False, "url": b.redacted(b.normalise_url(settings.broker_url))}
        try:
            b.ping()
            status["running"] = True
        except ArchiveAsrError as e:
            status.update(running=False, error=str(e))
    else:
        status = {"embedded": True, **b.embedded_status()}
    if status["running"]:
        status["queues"] = _queue_lengths()
    if as_json:
        click.echo(json.dumps(status))
        return
    kind = "embedded Valkey" if status["embedded"] else "configured broker"
    condition = status.get("state") or ("running" if status["running"] else "not running")
    click.echo(f"{kind}: {condition} ({status.get('url') or 'never started'})")
    if status.get("pid"):
        click.echo(f"pid {status['pid']}, data in {status['data_dir']}")
    if status.get("reason"):
        click.echo(f"  {status['reason']}")
    for name, n in status.get("queues", {}).items():
        click.echo(f"  {name}: {n} waiting")


@broker.command("start")
def broker_start() -> None:
    """Start the embedded broker now (any command that needs it starts it anyway)."""
    from worker import broker as b

    if not b.is_embedded():
        raise click.ClickException("ARCHIVE_ASR_BROKER_URL is set: that broker is managed elsewhere")
    try:
        state = b.ensure_embedded()
    except ArchiveAsrError as e:
        raise _fail(e) from e
    click.echo(f"embedded Valkey running on {b.redacted(state.url)} (pid {state.pid})")


@broker.command("stop")
def broker_stop() -> None:
    """Stop the embedded broker; waiting messages are kept on disk for its next start."""
    from worker import broker as b

    if not b.is_embedded():
        raise click.ClickException("ARCHIVE_ASR_BROKER_URL is set: stop that broker where it runs")
    try:
        pid = b.stop_embedded()
    except ArchiveAsrError as e:
        raise _fail(e) from e
    click.echo(f"embedded Valkey stopped (pid {pid})" if pid else "embedded Valkey was not running")


# --- flower ------------------------------------------------------------------------------------------


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


FLOWER_TASKS_COLUMNS = "name,state,kwargs,result,received,runtime,worker,uuid"
# Flower options our settings decide; inherited FLOWER_* variables must not override them (Flower
# reads its environment), least of all FLOWER_UNAUTHENTICATED_API, which opens its control API.
FLOWER_ENV_OVERRIDES = ("FLOWER_UNAUTHENTICATED_API", "FLOWER_BASIC_AUTH", "FLOWER_AUTH", "FLOWER_ADDRESS", "FLOWER_PORT")


@click.command()
@click.option("--address", default=None, help="Address to bind (default: ARCHIVE_ASR_FLOWER_ADDRESS, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: ARCHIVE_ASR_FLOWER_PORT, 5555).")
@click.option("--basic-auth", default=None,
              help="user:password, neither empty (default: ARCHIVE_ASR_FLOWER_BASIC_AUTH).")
def flower(address: str | None, port: int | None, basic_auth: str | None) -> None:
    """Start Flower, the live view of workers and tasks (read-only without a password)."""
    from archive_asr.settings import check_basic_auth

    try:
        settings = get_settings()
    except ConfigError as e:
        raise _fail(e) from e
    address = address or settings.flower_address
    port = port or settings.flower_port
    basic_auth = basic_auth if basic_auth is not None else settings.flower_basic_auth
    if basic_auth:
        try:
            check_basic_auth(basic_auth)
        except ValueError as e:
            raise click.ClickException(f"Flower's basic auth {e} (--basic-auth or ARCHIVE_ASR_FLOWER_BASIC_AUTH)") from e
    elif not is_loopback(address):
        raise click.ClickException(
            f"refusing to serve Flower on {address} without a password: set ARCHIVE_ASR_FLOWER_BASIC_AUTH=user:password "
            "or bind 127.0.0.1"
        )
    for name in FLOWER_ENV_OVERRIDES:
        os.environ.pop(name, None)
    # The Tasks list shows each job's file and duration (the task's kwargs) and its short result:
    # Flower 2.2's default columns hide both, leaving only task names and UUIDs.
    argv = ["flower", f"--address={address}", f"--port={port}", f"--tasks_columns={FLOWER_TASKS_COLUMNS}"]
    if basic_auth:
        argv.append(f"--basic_auth={basic_auth}")
    # Without a password Flower's API (worker shutdown, pool restart, task revoke) stays off: any
    # local user or any web page in this machine's browser could call it.
    try:
        from worker.app import app

        app.conf.broker_url  # noqa: B018  (resolve the broker now: starts the embedded one if needed)
    except ArchiveAsrError as e:
        raise _fail(e) from e
    click.echo(
        f"Flower on http://{address}:{port}"
        + (" (basic auth)" if basic_auth else
           " (this machine only, read-only: its API and worker controls are off without ARCHIVE_ASR_FLOWER_BASIC_AUTH)"),
        err=True,
    )
    app.start(argv)
