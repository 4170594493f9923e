"""How the CLI hands new jobs to the workers: the dispatch function given to the scheduler's commands."""

from __future__ import annotations

from collections.abc import Sequence

import click


def start_broker() -> tuple[str | None, bool]:
    """Find or start the broker: (the embedded server's address, or None for a configured broker;
    whether this call started the embedded server)."""
    from worker import broker

    if not broker.is_embedded():
        return None, False
    state, started = broker.start_embedded()
    return f"{broker.HOST}:{state.port}", started


def started_note(address: str) -> str:
    """The one line a command prints after starting the embedded broker."""
    return (f"started the embedded Valkey broker on {address}; it keeps running in the background for the "
            "workers (`archive-asr broker stop` stops it)")


class BrokerDispatch:
    """Publishes job ids on the broker (worker.dispatch); says once if it had to start the embedded one."""

    def __init__(self) -> None:
        self._checked = False

    def __call__(self, job_ids: Sequence[int]) -> int:
        if not self._checked:
            address, started = start_broker()
            self._checked = True
            if started:
                click.echo(started_note(address), err=True)
        from worker.dispatch import dispatch_jobs

        return dispatch_jobs(job_ids)
