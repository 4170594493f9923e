"""`python -m cli ARGS` = `archive-asr ARGS` (how `run` and the tests start workers with this interpreter)."""

from cli import main

main(prog_name="archive-asr")
