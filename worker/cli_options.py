"""Option parsing shared by the worker and engine commands."""

from __future__ import annotations

import click


def parse_batch_size(value: str) -> int:
    """'auto' -> 0 (chosen from the device's memory), else a positive number of windows per batch."""
    if value == "auto":
        return 0
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n <= 0:
        raise click.BadParameter("use 'auto' or a positive number of windows per batch", param_hint="--batch-size")
    return n
