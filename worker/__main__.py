"""`python -m worker ARGS` = `archive-asr ARGS` (used to start local workers with this interpreter)."""

from scheduler.cli import main

main(prog_name="archive-asr")
