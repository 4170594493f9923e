"""The `archive-asr` command line: one root group over every command, above all other packages.

Arrows run one way: this package imports the scheduler's commands (the job table), the worker's
(the queue and the engine) and `run`, which combines both; neither of those imports the other or
this package. The scheduler reaches the workers only through the dispatch function this group
hands it (`scheduler.commands.Wiring`), so `archive-asr enqueue` imports Celery only when it
dispatches, and MLX never (enqueueing runs on any box, a NAS too).
"""

from __future__ import annotations

import click

from archive_asr.errors import ArchiveAsrError
from cli.dispatch import BrokerDispatch
from cli.run import run
from scheduler.commands import Wiring, db, enqueue, export, retry, search, status
from worker.commands import broker, flower, reconcile, worker
from worker.engine_commands import models, transcribe


class Group(click.Group):
    """The root group: expected failures (bad settings, a database that doesn't answer) as one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as e:
            message = _expected_failure(e)
            if message is None:
                raise
            raise click.ClickException(message) from e


def _expected_failure(e: Exception) -> str | None:
    """The one-line message for an error a user can fix, or None for a bug (keep its traceback)."""
    if isinstance(e, ArchiveAsrError):
        return str(e)
    if type(e).__module__.startswith("sqlalchemy"):
        from sqlalchemy.exc import InterfaceError, OperationalError

        if isinstance(e, (OperationalError, InterfaceError)):
            reason = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
            return f"database error: {reason}"
    return None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="archive-asr")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Turn folders of recordings into a searchable database of transcripts."""
    ctx.obj = Wiring(dispatch=BrokerDispatch())


for command in (enqueue, status, export, search, retry, db, worker, run, reconcile, broker, flower, transcribe, models):
    main.add_command(command)
