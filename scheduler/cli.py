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


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="archive-asr")
def main() -> None:
    """Turn folders of recordings into a searchable database of transcripts."""
