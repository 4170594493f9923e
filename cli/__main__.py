"""`python -m cli ARGS` = `archive-asr ARGS` (how `run` and the tests start workers with this interpreter)."""

from cli import main

if __name__ == "__main__":  # not again in a spawned child process (a worker's audio decoders)
    main(prog_name="archive-asr")
