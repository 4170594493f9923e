"""CLI commands for the queue: worker, run, reconcile, broker, flower.

Imported lazily by scheduler.cli only when one of them is invoked.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from archive_asr.errors import ArchiveAsrError, ConfigError
from archive_asr.settings import get_settings
from worker.cli_options import parse_batch_size


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e))


def worker_argv(*, model: str, concurrency: int, loglevel: str) -> list[str]:
    """The `celery worker` arguments for this platform: one queue (one model), events on."""
    from worker.app import queue_for_model

    queue = queue_for_model(model)
    # MLX/Metal is not fork-safe: on macOS (and for one slot anywhere) the task runs in a thread
    # of this process, which keeps the main thread free to talk to the broker while MLX works.
    pool = "threads" if concurrency == 1 or sys.platform == "darwin" else "prefork"
    return [
        "worker",
        "-Q", queue,
        "-n", f"{queue.removeprefix('asr.')}-{os.getpid()}@%h",
        "-E",
        f"--pool={pool}",
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
@click.option("--batch-size", default=None, help="Windows per batch: 'auto' (from device memory) or a number.")
@click.option("--concurrency", "-c", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Jobs at once; above 1 forks one process per slot (Linux only), each with its own model.")
@click.option("--loglevel", "-l", default=None, help="Log level (default: ARCHIVE_ASR_LOG_LEVEL).")
@click.option("--reconcile/--no-reconcile", default=True, show_default=True,
              help="Also run the periodic reconciler (one per fleet acts at a time).")
def worker(model: str | None, batch_size: str | None, concurrency: int, loglevel: str | None, reconcile: bool) -> None:
    """Start a worker that transcribes one model's jobs from the queue."""
    settings = get_settings()
    model = model or settings.model
    if concurrency > 1 and sys.platform == "darwin":
        raise click.ClickException(
            "MLX/Metal is not fork-safe: on macOS run one job per process; start another `archive-asr worker` instead"
        )
    batch = parse_batch_size(batch_size) if batch_size is not None else settings.batch_size
    try:
        _wait_for_database()
        from worker.app import app

        app.conf.archive_asr_batch_size = batch
        app.conf.archive_asr_reconcile = reconcile
    except ArchiveAsrError as e:
        raise _fail(e) from e
    app.worker_main(worker_argv(model=model, concurrency=concurrency, loglevel=loglevel or settings.log_level))


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
    argv = ["flower", f"--address={address}", f"--port={port}"]
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


# --- run ---------------------------------------------------------------------------------------------


def _counts(models: set[str] | None = None) -> dict[str, int]:
    from sqlalchemy import func, select

    from models.db import session_scope
    from models.tables import Job

    with session_scope() as session:
        stmt = select(Job.status, func.count()).group_by(Job.status)
        if models is not None:
            stmt = stmt.where(Job.model.in_(models))
        return {status.value: n for status, n in session.execute(stmt).all()}


def _pending_models() -> list[str]:
    from sqlalchemy import select

    from models.db import session_scope
    from models.tables import Job, JobStatus

    with session_scope() as session:
        return sorted(set(session.scalars(select(Job.model).where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])))))


def _start_local_worker(model: str, batch_size: str | None, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "worker", "worker", "--model", model, "--no-reconcile"]
    if batch_size:
        cmd += ["--batch-size", batch_size]
    log_file = open(log_path, "ab")
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _stop_worker(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # warm shutdown: finishes the job in hand
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# The query `run` shows at the end; it runs as is on SQLite and PostgreSQL.
RESULTS_SQL = (
    "SELECT j.path, t.language, round(CAST(t.duration_s AS numeric), 1) AS seconds, "
    "round(CAST(t.real_time_factor AS numeric), 1) AS x_real_time, substr(t.text, 1, 60) AS text "
    "FROM jobs j JOIN transcripts t ON t.job_id = j.id ORDER BY j.path;"
)


def _sql_hint(url: str) -> str:
    """The shell command that runs RESULTS_SQL against this database."""
    if url.startswith("sqlite"):
        return f"sqlite3 '{url.split(':///', 1)[1]}' \"{RESULTS_SQL}\""
    from models.db import safe_url

    return f"psql '{safe_url(url).replace('+psycopg', '')}' -c \"{RESULTS_SQL}\""


def _show_results(url: str) -> None:
    """Print where the results are, one SQL query over them, and what it returns."""
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy import text

    from models.db import safe_url, session_scope

    click.echo(f"results: {safe_url(url)}")
    click.echo(f"query:   {_sql_hint(url)}")
    with session_scope() as session:
        result = session.execute(text(RESULTS_SQL))
        table = Table()
        for name in result.keys():
            table.add_column(name, overflow="fold")  # full paths, wrapped rather than cut
        for row in result:
            table.add_row(*("" if v is None else str(v) for v in row))
    Console().print(table)


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--model", "-m", default=None, help="Whisper model (default: ARCHIVE_ASR_MODEL).")
@click.option("--language", default=None, help="Language code, or 'auto' to detect per file.")
@click.option("--batch-size", default=None, help="Windows per batch: 'auto' or a number.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def run(paths: tuple[Path, ...], model: str | None, language: str | None, batch_size: str | None, quiet: bool) -> None:
    """Enqueue PATHS and transcribe them here with one local worker until the queue drains."""
    from scheduler.cli import main as cli_main

    settings = get_settings()
    if batch_size:
        parse_batch_size(batch_size)
    enqueue_args = ["enqueue", *map(str, paths)]
    if model:
        enqueue_args += ["--model", model]
    if language:
        enqueue_args += ["--language", language]
    if quiet:
        enqueue_args.append("--quiet")
    try:
        from worker.broker import broker_url

        broker_url()  # start (or find) the embedded broker before the enqueue dispatches to it
        cli_main.main(args=enqueue_args, prog_name="archive-asr", standalone_mode=False)
        from worker.reconcile import reconcile as run_reconcile

        run_reconcile(force=True, grace=0)  # jobs left from an earlier, interrupted run
    except ArchiveAsrError as e:
        raise _fail(e) from e

    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "run-worker.log"
    from worker.reconcile import ReconcileThread

    reconciler = ReconcileThread()
    reconciler.start()
    try:
        for job_model in _pending_models():
            _drain(job_model, batch_size, log_path, quiet)
    finally:
        reconciler.stop()

    counts = _counts()
    click.echo(f"done: {counts.get('done', 0)}, failed: {counts.get('failed', 0)} (all jobs in the database)")
    _print_failures()
    _show_results(settings.resolved_database_url)
    from worker.broker import is_embedded

    if is_embedded():
        click.echo("(the embedded broker keeps running for the next command: `archive-asr broker stop` stops it)", err=True)


def _drain(model: str, batch_size: str | None, log_path: Path, quiet: bool) -> None:
    """Run one local worker for `model` until none of its jobs is queued or running."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    models = {model}
    before = _counts(models)
    finished_before = before.get("done", 0) + before.get("failed", 0)
    proc = _start_local_worker(model, batch_size, log_path)
    restarts = 0
    progress = Progress(
        TextColumn(f"[bold]{model}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(), disable=quiet, transient=False,
    )
    try:
        with progress:
            bar = progress.add_task(model, total=None, state="starting worker")
            while True:
                counts = _counts(models)
                pending = counts.get("queued", 0) + counts.get("running", 0)
                finished = counts.get("done", 0) + counts.get("failed", 0) - finished_before
                progress.update(bar, total=finished + pending, completed=finished,
                                state=f"{counts.get('running', 0)} running, {counts.get('failed', 0)} failed")
                if pending == 0:
                    break
                if proc.poll() is not None:
                    restarts += 1
                    if restarts > 3:
                        raise click.ClickException(f"the local worker keeps exiting; see its log: {log_path}")
                    proc = _start_local_worker(model, batch_size, log_path)
                time.sleep(0.5)
    except KeyboardInterrupt:
        click.echo("interrupted: stopping the worker (jobs left queued run next time)", err=True)
        _stop_worker(proc, timeout_s=10)
        raise SystemExit(130) from None
    _stop_worker(proc)


def _print_failures(limit: int = 10) -> None:
    from sqlalchemy import select

    from models.db import session_scope
    from models.tables import Job, JobStatus

    with session_scope() as session:
        rows = session.execute(
            select(Job.path, Job.error).where(Job.status == JobStatus.FAILED).order_by(Job.finished_at.desc()).limit(limit)
        ).all()
    for path, error in rows:
        click.echo(f"  failed: {path}: {error}", err=True)
