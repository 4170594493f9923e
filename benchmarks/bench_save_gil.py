"""How a worker's transcript saves slow the engine's driver thread (one process, one GIL).

The files of a round finish together, and each task thread then writes its transcript (the job,
its segments, its ~800 words). Meanwhile the driver thread does the Python work between two
rounds. This measures a stand-in for that work (a pure-Python loop, ~35 ms alone here) run
alone, beside 8 saves at once (as the task threads did), and beside 8 saves made one after
another (worker.saving's lock), on a fresh PostgreSQL database:

    .venv/bin/python benchmarks/bench_save_gil.py --database postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SAVES = 8  # transcripts finishing in one round: ~497 files over 62 rounds at 64 rows (H200, 24.6 h)


def transcript():
    """A 5-minute transcript: 50 segments of 16 words."""
    from archive_asr.records import Segment, Timing, Transcript, Word

    segments = tuple(
        Segment(start_s=6.0 * i, end_s=6.0 * i + 5.5, text=" ".join(f"word{j}," for j in range(16)), avg_logprob=-0.2,
                no_speech_prob=0.01, compression_ratio=1.3, temperature=0.0,
                words=tuple(Word(start_s=6.0 * i + 0.3 * j, end_s=6.0 * i + 0.3 * j + 0.25, word=f" word{j},", probability=0.9)
                            for j in range(16)))
        for i in range(50)
    )
    return Transcript(language="en", language_probability=0.99, duration_s=300.0, text="...", segments=segments,
                      timing=Timing(audio_s=300.0, wall_s=1.0, batch_size=64, device="gpu", model="base"))


def driver_work() -> int:
    """Pure Python for ~35 ms on a 2-core x86 box: stands for the driver's work between rounds."""
    x = 0
    for i in range(600_000):
        x += i * i % 7
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--database", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="a PostgreSQL server (its database is used to create a scratch one)")
    ap.add_argument("--trials", type=int, default=8)
    args = ap.parse_args()
    import psycopg

    from models.db import get_engine, session_scope
    from models.jobs import finish_job
    from models.tables import Job, JobStatus

    with psycopg.connect(args.database, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS bench_save_gil WITH (FORCE)")
        conn.execute("CREATE DATABASE bench_save_gil")
    url = args.database.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/bench_save_gil"
    get_engine(url)  # migrated
    jobs = 3 * args.trials * SAVES * 2
    with session_scope(url) as s:
        s.add_all(Job(key=f"k{i}", path=f"/a/{i}.wav", path_bytes=b"x", size=1, mtime=0.0, sha256="0" * 64,
                      status=JobStatus.RUNNING, model="base") for i in range(jobs))
    t = transcript()
    ids = iter(range(1, jobs + 1))
    lock = threading.Lock()

    def save(one_at_a_time: bool) -> None:
        job_id = next(ids)
        if one_at_a_time:
            lock.acquire()
        try:
            with session_scope(url) as s:
                finish_job(session=s, job_id=job_id, transcript=t)
        finally:
            if one_at_a_time:
                lock.release()

    def trial(mode: str) -> float:
        threads = [threading.Thread(target=save, args=(mode == "one at a time",)) for _ in range(SAVES if mode != "alone" else 0)]
        for th in threads:
            th.start()
        t0 = time.perf_counter()
        driver_work()
        took = time.perf_counter() - t0
        for th in threads:
            th.join()
        return took

    for _ in range(2):
        for mode in ("alone", f"{SAVES} saves at once", "one at a time"):
            ms = [1000 * trial(mode) for _ in range(args.trials)]
            print(f"{mode:>16}: driver {statistics.median(ms):.0f} ms median ({', '.join(f'{m:.0f}' for m in ms)})", flush=True)


if __name__ == "__main__":
    main()
