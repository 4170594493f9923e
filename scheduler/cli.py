"""The `archive-asr` command group.

Scheduler commands live in `scheduler`; commands that start workers or run the engine live in
`worker` and are imported only when invoked, so `archive-asr enqueue` never imports Celery's
worker machinery or MLX (enqueueing runs on any box, a NAS too).
"""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute"; each module defines one click command or group.
LAZY_COMMANDS: dict[str, str] = {
    # scheduler (this package): the job table
    "enqueue": "scheduler.commands:enqueue",
    "status": "scheduler.commands:status",
    "export": "scheduler.commands:export",
    "search": "scheduler.commands:search",
    "retry": "scheduler.commands:retry",
    "db": "scheduler.commands:db",
    # worker package: the queue
    "worker": "worker.commands:worker",
    "run": "worker.commands:run",
    "reconcile": "worker.commands:reconcile",
    "broker": "worker.commands:broker",
    "flower": "worker.commands:flower",
    # worker package: the engine, no queue
    "transcribe": "worker.engine_commands:transcribe",
    "models": "worker.engine_commands:models",
}


class LazyGroup(click.Group):
    """A click group that imports each subcommand's module on first use (click docs' pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(LAZY_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(module_name.split(".")[0]):
                raise click.ClickException(f"'{name}' is not built yet ({module_name} is missing)") from e
            raise
        return getattr(module, attr)

    def invoke(self, ctx: click.Context):
        """Expected failures (bad settings, a database that doesn't answer) as one line, no traceback."""
        try:
            return super().invoke(ctx)
        except Exception as e:
            message = _expected_failure(e)
            if message is None:
                raise
            raise click.ClickException(message) from e


def _expected_failure(e: Exception) -> str | None:
    """The one-line message for an error a user can fix, or None for a bug (keep its traceback)."""
    from archive_asr.errors import ArchiveAsrError

    if isinstance(e, ArchiveAsrError):
        return str(e)
    if type(e).__module__.startswith("sqlalchemy"):
        from sqlalchemy.exc import InterfaceError, OperationalError

        if isinstance(e, (OperationalError, InterfaceError)):
            reason = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
            return f"database error: {reason}"
    return None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="archive-asr")
def main() -> None:
    """Turn folders of recordings into a searchable database of transcripts."""
