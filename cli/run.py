"""`archive-asr run`: enqueue PATHS, transcribe them here with local workers, print their results.

The local workers: one per GPU of this machine, supervised as one process (`archive-asr worker
--per-gpu`) where it has several; a plain `worker --device gpu:0` on a Mac or a CUDA box with one
card, `--device cpu` on a box without one.

It lives in the CLI package because it combines the scheduler (enqueue) with the worker (a local
worker process, the reconciler, the embedded broker), which never import each other.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import click

from archive_asr.errors import ArchiveAsrError
from archive_asr.settings import get_settings
from cli.dispatch import BrokerDispatch, start_broker
from scheduler.commands import enqueue_paths
from scheduler.enqueue import EnqueueError, job_spec
from scheduler.export import printable
from worker.cli_options import parse_batch_size
from worker.supervisor import stop_gracefully

CHUNK = 500  # job ids per IN (...) list
SHOW_ROWS = 50  # results shown in the table (and named in the query) at most
WORKER_RESTARTS = 3
POLL_S = 0.25  # how often the run looks at its jobs' states


@dataclass(frozen=True)
class RunJob:
    id: int
    path: str
    status: str
    error: str | None
    finished_at: datetime | None


def _jobs(*, keys: Iterable[str] = (), ids: Iterable[int] = ()) -> list[RunJob]:
    """This run's jobs, by `jobs.key` or id, in path order."""
    from sqlalchemy import select

    from models.db import session_scope
    from models.tables import Job

    column, values = (Job.key, list(keys)) if keys else (Job.id, list(ids))
    out: list[RunJob] = []
    with session_scope() as session:
        for i in range(0, len(values), CHUNK):
            rows = session.execute(
                select(Job.id, Job.path, Job.status, Job.error, Job.finished_at).where(column.in_(values[i : i + CHUNK]))
            ).all()
            out += [RunJob(r.id, r.path, r.status.value, r.error, r.finished_at) for r in rows]
    return sorted(out, key=lambda j: (j.path, j.id))


def _device_args(gpus: Future) -> list[str]:
    """One GPU or none: a plain worker on it, one Python start fewer than a supervisor and its
    child (a second on a GPU box); several: one per card, supervised (`--per-gpu`)."""
    try:
        n = gpus.result()
    except ArchiveAsrError:
        return ["--per-gpu"]  # which says what is wrong with the GPUs, in the worker's log
    return ["--per-gpu"] if n > 1 else ["--device", "gpu:0" if n == 1 else "cpu"]


def _start_local_worker(model: str, batch_size: str | None, device_args: list[str], log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cli", "worker", *device_args, "--model", model, "--no-reconcile"]
    if batch_size:
        cmd += ["--batch-size", batch_size]
    with open(log_path, "ab") as log_file:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


class LocalWorkers:
    """The run's local workers, started once the broker is up, before the scan: their imports and
    model load (seconds; more on a GPU) overlap the scan and the hashing, and a folder on a NAS
    need not be walked before the first one starts. A run that finds nothing to do stops them.

    The GPUs are counted (a subprocess, engine.device) as the run begins, beside the broker's
    start; the count is left in the environment, so the workers do not count again.
    """

    def __init__(self, model: str, batch_size: str | None, log_path: Path):
        from engine.device import count_gpus

        self.model, self.batch_size, self.log_path = model, batch_size, log_path
        self.proc: subprocess.Popen | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="count-gpus")
        self._gpus = self._pool.submit(count_gpus)

    def start(self) -> subprocess.Popen:
        if self.proc is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.proc = _start_local_worker(self.model, self.batch_size, _device_args(self._gpus), self.log_path)
        return self.proc

    def restart(self) -> subprocess.Popen:
        self.proc = None
        return self.start()

    def stop(self, timeout_s: float = 60) -> None:
        self._pool.shutdown(wait=False)
        if self.proc is not None:
            stop_gracefully(self.proc, timeout_s)


def _drain(workers: LocalWorkers, ids: list[int], quiet: bool) -> None:
    """Run the local workers until none of this run's jobs is queued or running.

    The worker takes its queue in priority order, so other waiting jobs of the model may run too.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    model = workers.model
    proc = workers.start()
    restarts = 0
    progress = Progress(
        TextColumn(f"[bold]{model}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(), disable=quiet, transient=False,
    )
    try:
        with progress:
            bar = progress.add_task(model, total=len(ids), state="starting worker")
            while True:
                statuses = [j.status for j in _jobs(ids=ids)]
                pending = sum(s in ("queued", "running") for s in statuses)
                progress.update(bar, completed=len(statuses) - pending,
                                state=f"{statuses.count('running')} running, {statuses.count('failed')} failed")
                if pending == 0:
                    break
                if proc.poll() is not None:
                    restarts += 1
                    if restarts > WORKER_RESTARTS:
                        raise click.ClickException(f"the local workers keep exiting; see their log: {workers.log_path}")
                    proc = workers.restart()
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        click.echo("interrupted: stopping the workers (jobs left queued run next time)", err=True)
        workers.stop(timeout_s=10)
        raise SystemExit(130) from None


# The query `run` shows at the end, over this run's jobs; it runs as is on SQLite and PostgreSQL.
RESULTS_SQL = (
    "SELECT j.path, t.language, round(CAST(t.duration_s AS numeric), 1) AS seconds, "
    "round(CAST(t.real_time_factor AS numeric), 1) AS x_real_time, substr(t.text, 1, 60) AS text "
    "FROM jobs j JOIN transcripts t ON t.job_id = j.id WHERE j.id IN ({ids}) ORDER BY j.path;"
)


def _sql_hint(url: str, sql: str) -> str:
    """The shell command that runs `sql` against this database."""
    if url.startswith("sqlite"):
        return f"sqlite3 '{url.split(':///', 1)[1]}' \"{sql}\""
    from models.db import safe_url

    return f"psql '{safe_url(url).replace('+psycopg', '')}' -c \"{sql}\""


def _show_results(url: str, jobs: list[RunJob]) -> None:
    """Print where the results are, the SQL query that shows this run's transcripts, and its result."""
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy import text

    from models.db import safe_url, session_scope

    shown = [j.id for j in jobs[:SHOW_ROWS]]
    sql = RESULTS_SQL.format(ids=", ".join(map(str, shown)))
    click.echo(f"results: {safe_url(url)}")
    if len(jobs) > len(shown):
        click.echo(f"(the first {len(shown)} of {len(jobs)} files; `archive-asr export --out DIR PATH...` writes them all)")
    click.echo(f"query:   {_sql_hint(url, sql)}")
    with session_scope() as session:
        result = session.execute(text(sql))
        table = Table()
        for name in result.keys():
            table.add_column(name, overflow="fold")  # full paths, wrapped rather than cut
        for row in result:
            table.add_row(*("" if v is None else str(v) for v in row))
    Console().print(table)


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--model", "-m", default=None, help="Whisper model (default: ARCHIVE_ASR_MODEL).")
@click.option("--language", default=None, help="Language code, or 'auto' to detect per file.")
@click.option("--batch-size", default=None, help="Windows per batch: 'auto' or a number.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def run(paths: tuple[Path, ...], model: str | None, language: str | None, batch_size: str | None, quiet: bool) -> None:
    """Enqueue PATHS, transcribe them here with one local worker per GPU (or one on the CPU), and print their results.

    Exits with status 1 when any of their jobs failed, printing each with its reason. An embedded
    broker that this command started is stopped at the end.
    """
    from models.base import utcnow
    from worker.reconcile import ReconcileThread
    from worker.reconcile import reconcile as run_reconcile

    settings = get_settings()
    if batch_size:
        parse_batch_size(batch_size)
    try:
        spec = job_spec(model=model or settings.model, language=language, word_timestamps=True, priority=0)
    except EnqueueError as e:
        raise click.ClickException(str(e)) from e
    began = utcnow()
    workers = LocalWorkers(spec.model, batch_size, settings.data_dir / "logs" / "run-worker.log")
    try:
        address, started_broker = start_broker()  # before the enqueue dispatches to it
    except ArchiveAsrError as e:
        raise click.ClickException(str(e)) from e
    if started_broker:
        click.echo(f"started the embedded Valkey broker on {address}; this run stops it when it ends", err=True)
    try:
        # jobs left from an earlier, interrupted run: before this run's jobs exist and its workers
        # start, so the pass never races a worker that is receiving a message
        run_reconcile(force=True, grace=0)
        workers.start()
        summary = enqueue_paths(paths=[str(p) for p in paths], spec=spec, send=BrokerDispatch(), quiet=quiet)
        jobs = _jobs(keys=summary.job_keys)
        ids = [j.id for j in jobs]
        if any(j.status in ("queued", "running") for j in jobs):
            reconciler = ReconcileThread()
            reconciler.start()
            try:
                _drain(workers, ids, quiet)
            finally:
                reconciler.stop()
                reconciler.join(timeout=30)  # a pass in flight finishes before the broker may stop
        jobs = _jobs(ids=ids)
    except ArchiveAsrError as e:
        raise click.ClickException(str(e)) from e
    finally:
        workers.stop()
        if started_broker:
            from worker.broker import stop_embedded

            stop_embedded()
            click.echo("stopped the embedded broker that this run had started", err=True)

    failed = [j for j in jobs if j.status == "failed"]
    done = sum(j.status == "done" for j in jobs)
    click.echo(f"done: {done}, failed: {len(failed)} (the {len(jobs)} file(s) of this run)")
    for j in failed:
        earlier = " (failed before this run; `archive-asr retry` re-queues it)" if j.finished_at and j.finished_at < began else ""
        click.echo(f"  failed: {printable(j.path)}: {(j.error or 'no reason recorded').strip().splitlines()[0]}{earlier}", err=True)
    if jobs:
        _show_results(settings.resolved_database_url, jobs)
    if address is not None and not started_broker:
        click.echo("(the embedded broker keeps running for the next command: `archive-asr broker stop` stops it)", err=True)
    if failed:
        click.get_current_context().exit(1)
