"""The scheduler's commands: enqueue, status, export, search, retry, db.

Each opens the database through models.db, which creates or migrates it on first use. The scheduler
never imports the worker package: new jobs reach the workers through the dispatch function that
the root command group (`cli.main`) puts in the click context as a `Wiring`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from archive_asr.errors import BrokerUnavailable
from archive_asr.settings import get_settings
from models.db import current_revision, get_engine, head_revision, safe_url, session_scope, upgrade
from models.tables import JobStatus
from scheduler.enqueue import EnqueueError, Enqueuer, JobSpec, Summary, job_spec
from scheduler.export import FORMATS, NotFound, load_transcript, output_name, printable, render, resolve_jobs

JSON_HELP = "Print machine-readable JSON instead of text."

# Job ids -> messages sent; raises BrokerUnavailable when the broker does not answer.
Dispatch = Callable[[Sequence[int]], int]


@dataclass(frozen=True)
class Wiring:
    """What the root command group gives the scheduler's commands (click's `ctx.obj`)."""

    dispatch: Dispatch | None = None  # None: jobs stay in the database for a reconciler to send


def _err(message: str) -> None:
    click.echo(message, err=True)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _times(factor: float) -> str:
    """A speed-up with sensible precision: 0.43x, 4.3x, 43x, 2135x."""
    return f"{factor:.2f}x" if factor < 1 else f"{factor:.1f}x" if factor < 100 else f"{factor:.0f}x"


def _per_hour(audio_hours_per_hour: float | None) -> str:
    if audio_hours_per_hour is None:
        return "- h of audio per hour"
    return f"{_times(audio_hours_per_hour).removesuffix('x')} h of audio per hour"


def _wired_dispatch() -> Dispatch | None:
    ctx = click.get_current_context(silent=True)
    wiring = ctx.find_object(Wiring) if ctx is not None else None
    return wiring.dispatch if wiring is not None else None


def dispatch(job_ids: list[int], *, send: Dispatch | None, quiet: bool) -> int | None:
    """Hand job ids to the workers' broker; None when there is no broker to send to.

    A broker that does not answer is no failure here: the jobs are safe in the database, and the
    reconciler or the next worker to start dispatches them.
    """
    if not job_ids or send is None:
        return None
    try:
        return send(job_ids)
    except BrokerUnavailable as e:
        if not quiet:
            _err(f"warning: {e}")
            _err("warning: the jobs are queued in the database; `archive-asr reconcile` "
                 "or the next worker to start will dispatch them")
        return None


# --------------------------------------------------------------------------------------- enqueue


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--model", "-m", default=None, help="Whisper model for these jobs (default: ARCHIVE_ASR_MODEL, 'base').")
@click.option("--language", "-l", default="auto", show_default=True,
              help="Spoken language as a Whisper code (en, de, ...), or 'auto' to detect it per file.")
@click.option("--no-words", is_flag=True, help="Skip word-level timestamps (segments only; faster).")
@click.option("--priority", "-p", type=int, default=0, show_default=True, help="Higher runs sooner.")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Only files whose name or path matches this glob (repeatable), e.g. '*.flac'.")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Leave out files whose name or path matches this glob (repeatable), e.g. '*/rejects/*'.")
@click.option("--dry-run", is_flag=True, help="Scan and report what would be queued; write nothing, hash nothing.")
@click.option("--no-dispatch", is_flag=True, help="Only write the jobs to the database; don't send them to workers.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no per-file messages.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def enqueue(paths, model, language, no_words, priority, include, exclude, dry_run, no_dispatch, quiet, as_json):
    """Scan folders and files for audio and queue one job per new recording.

    A PATH that does not exist is reported and makes the exit status 1, after the others are queued.
    """
    settings = get_settings()
    try:
        spec = job_spec(model=model or settings.model, language=language, word_timestamps=not no_words,
                        priority=priority)
    except EnqueueError as e:
        raise click.ClickException(str(e)) from e
    summary = enqueue_paths(paths=list(paths), spec=spec, include=include, exclude=exclude, dry_run=dry_run,
                            send=None if no_dispatch else _wired_dispatch(), quiet=quiet, as_json=as_json)
    if summary.missing:
        click.get_current_context().exit(1)


def enqueue_paths(*, paths: list[str], spec: JobSpec, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                  dry_run: bool = False, send: Dispatch | None, quiet: bool = False, as_json: bool = False) -> Summary:
    """Scan, hash and queue `paths` as `spec` says, send the new jobs with `send`, print the report."""
    get_engine()  # open (and create or migrate) the database before the long scan

    progress = None if quiet or as_json or not sys.stderr.isatty() else _progress()

    def on_skip(skipped):
        # A path that does not exist is an error, reported even with --quiet (as cp and ls do).
        if skipped.missing or not quiet:
            line = f"{'error: cannot access' if skipped.missing else 'skipped'} {printable(skipped.path)}: {skipped.reason}"
            (progress.console.print(line, markup=False, highlight=False) if progress else _err(line))

    dispatched: int | None = None
    broker_down = False

    def on_jobs(job_ids: list[int]) -> None:
        # Each chunk's new jobs go to the workers as soon as they are committed; after the broker
        # fails once, stop trying (the jobs wait in the database for `archive-asr reconcile`).
        nonlocal dispatched, broker_down
        if broker_down:
            return
        n = dispatch(job_ids, quiet=quiet or as_json, send=send)
        if n is None:
            broker_down = True
        else:
            dispatched = (dispatched or 0) + n

    enqueuer = Enqueuer(spec=spec, dry_run=dry_run, on_skip=on_skip,
                        on_jobs=None if dry_run or send is None else on_jobs)
    if progress is not None:
        scan_task = progress.add_task("scanning", total=None, unit="files")
        hash_task = None

        def on_found(_found):
            progress.advance(scan_task)

        def on_hash_start(files, nbytes):
            nonlocal hash_task
            progress.update(scan_task, total=progress.tasks[scan_task].completed)
            hash_task = progress.add_task(f"hashing {files} file(s)", total=nbytes)

        def on_bytes(n):
            progress.advance(hash_task, n)

        enqueuer.on_found, enqueuer.on_hash_start, enqueuer.on_bytes = on_found, on_hash_start, on_bytes
        with progress:
            summary = enqueuer.run(paths, include=include, exclude=exclude)
    else:
        summary = enqueuer.run(paths, include=include, exclude=exclude)

    if as_json:
        out = summary.to_json(dry_run=dry_run)
        out.update(model=spec.model, language=spec.language, word_timestamps=spec.word_timestamps,
                   dispatched=dispatched)
        click.echo(json.dumps(out, ensure_ascii=False))
        return summary
    s = summary
    verb = "would queue" if dry_run else "queued"
    new = s.would_create if dry_run else len(s.new_jobs)
    click.echo(f"found {s.found} audio file(s), {_hours(s.audio_s)} of audio"
               + (f" ({s.unprobed} without a readable duration)" if s.unprobed else ""))
    if dry_run:
        click.echo(f"  {s.unchanged} unchanged, {s.would_hash} new or changed (a real run hashes them to deduplicate)")
        click.echo(f"  {verb} at least {new} job(s) (model {spec.model}, language {spec.language or 'auto'})")
    else:
        click.echo(f"  new: {new} job(s), {_hours(s.new_audio_s)} (model {spec.model}, language {spec.language or 'auto'}"
                   f"{', no word timestamps' if not spec.word_timestamps else ''})")
        click.echo(f"  unchanged: {s.unchanged}  changed: {s.changed}  moved: {s.moved}  "
                   f"duplicates of known content: {s.duplicates}")
    skipped = len(s.skipped) - len(s.missing)
    if skipped:
        click.echo(f"  skipped: {skipped} (see the messages above)" if not quiet else f"  skipped: {skipped}")
    if s.missing:
        click.echo(f"  not found: {len(s.missing)} path(s) (see the errors above)")
    if s.excluded:
        click.echo(f"  left out by --include/--exclude: {s.excluded}")
    if s.unprobed and not dry_run:
        click.echo(f"  {s.unprobed} file(s) have no readable audio header; if they are not audio their jobs will "
                   "fail with the reason (see `archive-asr status`)")
    if dispatched is not None:
        click.echo(f"  dispatched {dispatched} job(s) to the workers")
    return summary


def _progress():
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    class _Counts(MofNCompleteColumn):
        def render(self, task):  # files while scanning, bytes while hashing
            return DownloadColumn().render(task) if task.description.startswith("hashing") else super().render(task)

    return Progress(TextColumn("{task.description}"), BarColumn(), _Counts(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True)


# ---------------------------------------------------------------------------------------- status


@click.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def status(as_json):
    """Show job counts, hours done and left, throughput, ETA, failures and workers."""
    from scheduler.status import build_report

    with session_scope() as session:
        report = build_report(session=session)
    if as_json:
        click.echo(json.dumps(report.to_json(), ensure_ascii=False))
        return
    c = report.counts
    click.echo(f"jobs: {report.total}  queued {c['queued']}  running {c['running']}  done {c['done']}  failed {c['failed']}")
    left = _hours(report.audio_s_left)
    if report.jobs_left_without_duration:
        left += f" (+{report.jobs_left_without_duration} file(s) of unknown length)"
    click.echo(f"audio: {_hours(report.audio_s_done)} done, {left} left")
    eta = f"; ETA {_duration(report.eta_s)}" if report.eta_s else (
        "; ETA unknown until jobs finish" if c["queued"] + c["running"] else "")
    rate = (f"{_hours(report.audio_s_last_hour)} of audio in {_duration(report.worked_s_last_hour)} of work, "
            f"{_per_hour(report.audio_hours_per_hour)}" if report.done_last_hour else "no job finished")
    click.echo(f"last hour: {report.done_last_hour} job(s), {rate}{eta}")
    if report.workers:
        click.echo("workers (last hour):")
        for w in report.workers:
            rtf = f"{_times(w.mean_real_time_factor)} real time" if w.mean_real_time_factor else "real time -"
            click.echo(f"  {w.host} ({w.device or 'device not yet known'}): running {w.running}, "
                       f"done {w.done_last_hour} ({_hours(w.audio_s_last_hour)}), {_per_hour(w.audio_hours_per_hour)}, "
                       f"{rtf}, last heartbeat {w.last_heartbeat or '-'}")
    if report.failures:
        click.echo(f"failed ({report.failed_total}; `archive-asr retry` re-queues them):")
        for f in report.failures:
            click.echo(f"  [{f.job_id}] {printable(f.path)}: {(f.error or 'no reason recorded').splitlines()[0]}")
        if report.failed_total > len(report.failures):
            click.echo(f"  ... and {report.failed_total - len(report.failures)} more (see --json or the jobs table)")
    if report.partials:
        click.echo(f"partial transcripts ({report.partial_total}; what the decoder said):")
        for p in report.partials:
            decoded = f"{p.decoded_s:.1f}" if p.decoded_s is not None else "?"
            stated = f" of {p.stated_s:.1f}" if p.stated_s is not None else ""
            more = f" (+{len(p.warnings) - 1} more)" if len(p.warnings) > 1 else ""
            click.echo(f"  [{p.job_id}] {printable(p.path)}: {decoded}{stated} s decoded; {p.warnings[0]}{more}")
        if report.partial_total > len(report.partials):
            click.echo(f"  ... and {report.partial_total - len(report.partials)} more (see --json or the transcripts table)")
    if report.total == 0:
        click.echo("nothing queued yet: `archive-asr enqueue /path/to/recordings`")


# ---------------------------------------------------------------------------------------- export


@click.command()
@click.argument("refs", nargs=-1, metavar="[JOB_OR_PATH]...")
@click.option("--format", "-f", "fmt", type=click.Choice(FORMATS), default="txt", show_default=True,
              help="Output format.")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write one file per transcript into this folder (created if missing).")
def export(refs, fmt, out_dir):
    """Write finished transcripts as txt, srt, vtt, json or tsv (stdout for a single one).

    With no JOB_OR_PATH, every finished transcript. A named job or file that has none yet (failed,
    running, queued) is reported with its reason, and the exit status is 1.
    """
    with session_scope() as session:
        try:
            jobs = resolve_jobs(session=session, refs=refs, status=JobStatus.DONE, latest_per_file=True)
            unfinished = _unfinished(session=session, refs=refs, exported=jobs) if refs else []
        except NotFound as e:
            raise click.ClickException(str(e)) from e
        for job in unfinished:
            _err(f"not exported: job {job.id} ({printable(job.path)}) {_why_unfinished(job)}")
        if not jobs:
            if not unfinished:
                _err("nothing to export: no finished transcripts" + (" for those arguments" if refs else " yet"))
            click.get_current_context().exit(1 if unfinished else 0)
        _write_exports(session=session, jobs=jobs, fmt=fmt, out_dir=out_dir)
    if unfinished:
        click.get_current_context().exit(1)


def _unfinished(*, session, refs: tuple[str, ...], exported: list) -> list:
    """Jobs named by `refs` that have no transcript, leaving out content that has one to export."""
    covered = {job.sha256 for job in exported}
    return [job for job in resolve_jobs(session=session, refs=refs, status=None)
            if job.status != JobStatus.DONE and job.sha256 not in covered]


def _why_unfinished(job) -> str:
    if job.status == JobStatus.FAILED:
        return f"failed: {(job.error or 'no reason recorded').strip().splitlines()[0]}"
    if job.status == JobStatus.RUNNING:
        return f"is still running on {job.worker_host or 'a worker'} (attempt {job.attempts})"
    return "is still queued, waiting for a worker" + (f" (last error: {job.error.splitlines()[0]})" if job.error else "")


def _write_exports(*, session, jobs: list, fmt: str, out_dir: Path | None) -> None:
    """Print one transcript (or a JSON list) to stdout, or write one file per transcript into out_dir."""
    if out_dir is None:
        if len(jobs) > 1 and fmt != "json":
            raise click.ClickException(f"{len(jobs)} transcripts match: pass --out DIR to write one file each "
                                       "(or --format json to print them as one list)")
        texts = [render(load_transcript(session=session, job_id=j.id), fmt) for j in jobs]
        if fmt == "json" and len(jobs) > 1:
            click.echo("[" + ",\n".join(t.rstrip("\n") for t in texts) + "]")
        else:
            click.echo(texts[0], nl=False)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for job in jobs:
        transcript = load_transcript(session=session, job_id=job.id)
        target = out_dir / output_name(transcript, fmt, taken)
        target.write_text(render(transcript, fmt), encoding="utf-8")
    click.echo(f"wrote {len(jobs)} {fmt} file(s) to {out_dir}")


# ---------------------------------------------------------------------------------------- search


def _clock(seconds: float) -> str:
    m, s = divmod(seconds, 60)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}"


@click.command()
@click.argument("query")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=50, show_default=True, help="Most results to show.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def search(query, limit, as_json):
    """Find segments whose text has all the QUERY's words ("quoted" for an exact phrase)."""
    from models.search import search_segments

    with session_scope() as session:
        hits = search_segments(session=session, query=query, limit=limit)
    if as_json:
        click.echo(json.dumps([h.__dict__ for h in hits], ensure_ascii=False))
        return
    if not hits:
        _err(f"no segment matches {query!r}")
        return
    for h in hits:
        click.echo(f"{printable(h.path)}  [{_clock(h.start_s)} - {_clock(h.end_s)}]  {h.text.strip()}")


# ----------------------------------------------------------------------------------------- retry


@click.command()
@click.argument("refs", nargs=-1, metavar="[JOB_OR_PATH]...")
@click.option("--no-dispatch", is_flag=True, help="Only re-queue in the database; don't send to workers.")
@click.option("--quiet", "-q", is_flag=True, help="No warnings about the broker.")
def retry(refs, no_dispatch, quiet):
    """Re-queue failed jobs (all of them when none is named), with a fresh attempt count."""
    from models.jobs import retry_job

    with session_scope() as session:
        try:
            jobs = resolve_jobs(session=session, refs=refs, status=JobStatus.FAILED)
        except NotFound as e:
            raise click.ClickException(str(e)) from e
        ids = [job.id for job in jobs if retry_job(session=session, job_id=job.id)]
    if not ids:
        click.echo("nothing to retry: no failed jobs" + (" among those arguments" if refs else ""))
        return
    click.echo(f"re-queued {len(ids)} job(s)")
    dispatched = None if no_dispatch else dispatch(ids, quiet=quiet, send=_wired_dispatch())
    if dispatched is not None:
        click.echo(f"dispatched {dispatched} job(s) to the workers")


# -------------------------------------------------------------------------------------------- db


@click.group()
def db():
    """Database maintenance."""


@db.command("upgrade")
def db_upgrade():
    """Create the database or migrate it to the newest schema (also done automatically on first use)."""
    engine = get_engine(migrate=False)
    before = current_revision(engine)
    after = upgrade(engine)
    url = safe_url(str(engine.url.render_as_string(hide_password=False)))
    if before == after:
        click.echo(f"{url}: already at revision {after} (head)")
    else:
        click.echo(f"{url}: upgraded {before or 'empty'} -> {after}")


@db.command("current")
def db_current():
    """Show the database URL and its schema revision."""
    engine = get_engine(migrate=False)
    rev = current_revision(engine)
    head = head_revision()
    click.echo(f"{safe_url(engine.url.render_as_string(hide_password=False))}: revision {rev or 'none'}"
               + (" (head)" if rev == head else f" (head is {head}; run `archive-asr db upgrade`)"))
