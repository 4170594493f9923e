"""Who holds a worker's GIL: py-spy samples (``record --gil --threads -f raw``) summed by thread role.

A worker's engine driver thread queues every MLX call from Python, so any other thread that holds
the GIL when the driver wants it delays the device's next step. This reads the raw files that
`run_on_device.sh fleetspy` writes (one per worker process) and prints, per file, how the samples
in which some thread held the GIL divide between the driver, the preparing threads, the saves
(SQLAlchemy, psycopg), Celery/kombu and the rest.

usage: python benchmarks/gil_holders.py SPY_DIR_OR_FILES...   (.txt, or .txt.gz as kept in benchmarks/reports)
"""

from __future__ import annotations

import collections
import gzip
import re
import sys
from pathlib import Path

# first match wins, tested against the whole stack (outermost frame first)
ROLES = (
    ("driver", ("engine-driver",)),
    ("preparing", ("engine/prepare.py", "engine/decoders.py", "engine/mel.py")),
    ("saves", ("worker/saving.py", "models/jobs.py", "sqlalchemy/", "psycopg/")),
    ("lease keeper", ("LeaseKeeper",)),
    ("celery/kombu", ("celery/", "kombu/", "billiard/", "redis/", "valkey/")),
)
LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")


def role(stack: str) -> str:
    for name, marks in ROLES:
        if any(m in stack for m in marks):
            return name
    return "other"


def summarise(path: Path) -> collections.Counter:
    by_role: collections.Counter = collections.Counter()
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    for line in data.decode(errors="replace").splitlines():
        m = LINE.match(line)
        if m:
            by_role[role(m["stack"])] += int(m["count"])
    return by_role


def main() -> None:
    paths = [p for arg in sys.argv[1:] for p in (sorted(Path(arg).glob("*.txt*")) if Path(arg).is_dir() else [Path(arg)])]
    if not paths:
        raise SystemExit(__doc__)
    for path in paths:
        by_role = summarise(path)
        total = sum(by_role.values()) or 1
        shares = ", ".join(f"{name} {n / total:.0%}" for name, n in by_role.most_common())
        print(f"{path.name}: {total} samples with the GIL held: {shares}")


if __name__ == "__main__":
    main()
