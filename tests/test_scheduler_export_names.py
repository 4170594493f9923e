"""`export --out DIR` writes every transcript, however long its file's name."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner

from models.db import session_scope
from models.jobs import claim_job, finish_job
from scheduler.enqueue import Enqueuer, job_spec
from tests.fixtures_db import make_transcript

LONG_NAMES = [f"{i:02d}-interview-é-" + "x" * (251 - len(f"{i:02d}-interview-é-") - len(".wav")) + ".wav"
              for i in range(10)]


def test_export_shortens_names_too_long_for_the_filesystem_and_writes_them_all(data_dir: Path, tmp_path: Path):
    from cli import main

    assert all(len(name) == 251 for name in LONG_NAMES)
    paths = []
    for folder in ("a", "b", "c"):  # the same 251-character names in three folders: their stems collide
        (tmp_path / folder).mkdir()
        for name in LONG_NAMES:
            path = tmp_path / folder / name
            path.write_bytes(f"RIFF {folder}/{name}".encode())  # distinct content: one job each
            paths.append(str(path))
    summary = Enqueuer(spec=job_spec(model="tiny.en", language=None, word_timestamps=True, priority=0)).run(paths)
    assert len(summary.new_jobs) == 30
    for job_id in summary.new_jobs:
        with session_scope() as s:
            assert claim_job(session=s, job_id=job_id, worker_host="test", lease_s=20)
            assert finish_job(session=s, job_id=job_id, transcript=make_transcript([(0.0, 1.0, f"job {job_id}")]))

    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", "--format", "json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = sorted(out.iterdir())
    assert len(written) == 30
    assert all(len(os.fsencode(p.name)) <= 255 for p in written)
    texts = {json.loads(p.read_text())["text"] for p in written}
    assert texts == {f"job {job_id}" for job_id in summary.new_jobs}  # every transcript, none overwritten
