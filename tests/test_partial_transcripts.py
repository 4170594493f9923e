"""Partial transcripts: damaged real files carry their decoder's marks into SQL, `status` and `export`;
a fixed file enqueued again answers `search` and `export` with one transcript; a file changed after
`enqueue` is caught before decoding.

The damaged files are made here from ../shared/audio; the transcript records carry what
engine.audio's DecodeReport said about them (the worker copies it the same way).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select, text

from archive_asr.records import Transcript as TranscriptRecord
from cli import main
from engine.audio import DecodeReport, iter_audio
from models.db import session_scope
from models.jobs import FILE_CHANGED, FILE_GONE, check_unchanged, claim_job, fail_job, finish_job
from models.tables import Job, JobStatus, Transcript
from tests.fixtures_db import db_url, make_transcript  # noqa: F401

REPO = Path(__file__).resolve().parents[1]

# The README's query for partial transcripts (test_readme_has_the_partial_query checks it is there).
SQL_PARTIAL = """
SELECT j.path, t.decoded_s, j.duration_s AS stated_s, t.warnings
FROM transcripts t
JOIN jobs j ON j.id = t.job_id
WHERE t.warnings IS NOT NULL
  AND j.sha256 IN (SELECT sha256 FROM files)
ORDER BY j.path;
"""

JFK = [
    (0.0, 4.2, "And so, my fellow Americans,"),
    (4.2, 8.0, "ask not what your country can do for you,"),
    (8.0, 11.0, "ask what you can do for your country."),
]


def run(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result


def truncate(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def corrupt(src: Path, dst: Path, start: float, end: float) -> Path:
    data = bytearray(src.read_bytes())
    i, j = int(len(data) * start), int(len(data) * end)
    data[i:j] = np.random.default_rng(0).bytes(j - i)
    dst.write_bytes(bytes(data))
    return dst


def decoded(path: Path, sentences: list[tuple[float, float, str]]) -> TranscriptRecord:
    """A transcript record carrying what the real decoder said about this file."""
    report = DecodeReport()
    for _ in iter_audio(path, report=report):
        pass
    return replace(make_transcript(sentences), duration_s=report.decoded_s, decoded_s=report.decoded_s,
                   warnings=tuple(report.warnings))


def jobs_by_name() -> dict[str, int]:
    with session_scope() as s:
        return {Path(j.path).name: j.id for j in s.scalars(select(Job).order_by(Job.id))}


def finish(job_id: int, record: TranscriptRecord) -> None:
    with session_scope() as s:
        assert claim_job(session=s, job_id=job_id, worker_host="mac-mini-1", lease_s=60) is not None
        assert finish_job(session=s, job_id=job_id, transcript=record)


@pytest.fixture
def damaged_archive(db_url, shared_audio: Path, tmp_path: Path) -> Path:
    """A flac cut to 30 %, an mp3 with a corrupt middle and an intact flac, enqueued and transcribed."""
    root = tmp_path / "archive"
    root.mkdir()
    truncate(shared_audio / "longform" / "english_read_mix_concat.flac", root / "long_cut.flac", 0.30)
    corrupt(shared_audio / "formats" / "jfk.mp3", root / "jfk_mid.mp3", 0.40, 0.50)
    shutil.copyfile(shared_audio / "en" / "jfk.flac", root / "jfk.flac")
    run("enqueue", "--no-dispatch", "--quiet", str(root))
    for name, job_id in jobs_by_name().items():
        finish(job_id, decoded(root / name, JFK))
    return root


def test_partial_transcripts_in_sql_status_and_export(damaged_archive: Path) -> None:
    with session_scope() as s:
        rows = {Path(path).name: (decoded_s, stated_s, warnings) for path, decoded_s, stated_s, warnings
                in s.execute(text(SQL_PARTIAL))}
    assert set(rows) == {"long_cut.flac", "jfk_mid.mp3"}  # the intact jfk.flac is not partial
    decoded_s, stated_s, warnings = rows["long_cut.flac"]
    assert 170 < decoded_s < 190 and stated_s == pytest.approx(601.0, abs=0.1)
    assert warnings.startswith(f"audio ends at {decoded_s:.1f} s of 601.0 s stated in the header (truncated file?")
    decoded_s, stated_s, warnings = rows["jfk_mid.mp3"]
    assert decoded_s == pytest.approx(11.0, abs=0.08) and stated_s == pytest.approx(11.0, abs=0.01)
    assert re.fullmatch(r"1\.\d\d s of damaged audio at 4\.\d\d s replaced by silence \(.+\)", warnings), warnings

    report = json.loads(run("status", "--json").stdout)
    partials = {Path(p["path"]).name: p for p in report["partials"]}
    assert report["partial_total"] == 2 and set(partials) == {"long_cut.flac", "jfk_mid.mp3"}
    assert partials["long_cut.flac"]["stated_s"] == pytest.approx(601.0, abs=0.1)
    assert partials["long_cut.flac"]["warnings"][0].startswith("audio ends at")
    out = run("status").stdout
    cut = rows["long_cut.flac"][0]
    assert re.search(rf"long_cut\.flac: {cut:.1f} of 601\.0 s decoded; audio ends at {cut:.1f} s", out), out
    assert re.search(r"jfk_mid\.mp3: 11\.0 of 11\.0 s decoded; 1\.\d\d s of damaged audio at 4\.\d\d s", out), out

    data = json.loads(run("export", "-f", "json", str(damaged_archive / "long_cut.flac")).stdout)
    assert data["decoded_s"] == pytest.approx(cut) and data["warnings"][0].startswith("audio ends at")
    txt = run("export", str(damaged_archive / "jfk_mid.mp3")).stdout
    assert txt.startswith("# 1.") and "replaced by silence" in txt.splitlines()[0]
    assert txt.splitlines()[2] == "And so, my fellow Americans,"
    vtt = run("export", "-f", "vtt", str(damaged_archive / "long_cut.flac")).stdout
    assert vtt.startswith("WEBVTT\n\nNOTE audio ends at")
    intact = run("export", str(damaged_archive / "jfk.flac")).stdout
    assert intact.splitlines()[0] == "And so, my fellow Americans,"
    assert json.loads(run("export", "-f", "json", str(damaged_archive / "jfk.flac")).stdout)["warnings"] == []


def test_readme_has_the_partial_query() -> None:
    blocks = [b.strip() for b in re.findall(r"```sql\n(.*?)```", (REPO / "README.md").read_text(), re.S)]
    assert SQL_PARTIAL.strip() in blocks


def test_a_fixed_file_enqueued_again_answers_with_one_transcript(db_url, shared_audio: Path, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    talk = truncate(shared_audio / "en" / "jfk.flac", root / "talk.flac", 0.5)
    run("enqueue", "--no-dispatch", "--quiet", str(root))
    (old_id,) = jobs_by_name().values()
    finish(old_id, decoded(talk, JFK[:1]))
    assert [h["job_id"] for h in json.loads(run("search", "--json", "fellow").stdout)] == [old_id]

    shutil.copyfile(shared_audio / "en" / "jfk.flac", talk)  # the file is fixed: the whole recording
    run("enqueue", "--no-dispatch", "--quiet", str(root))
    with session_scope() as s:
        jobs = list(s.scalars(select(Job).order_by(Job.id)))
    assert [j.id for j in jobs][0] == old_id and len(jobs) == 2 and jobs[0].sha256 != jobs[1].sha256
    new_id = jobs[1].id
    # until the fixed file is transcribed, the old content's transcript is no file's any more
    assert json.loads(run("search", "--json", "fellow").stdout) == []

    finish(new_id, decoded(talk, JFK))
    hits = json.loads(run("search", "--json", "fellow").stdout)
    assert [h["job_id"] for h in hits] == [new_id]
    assert {h["job_id"] for h in json.loads(run("search", "--json", "country").stdout)} == {new_id}
    txt = run("export", str(talk)).stdout
    assert txt.splitlines() == [text.strip() for _, _, text in JFK]
    assert json.loads(run("export", "-f", "json").stdout)["job_id"] == new_id  # one transcript, not a list
    out = tmp_path / "out"
    assert "wrote 1" in run("export", "-f", "srt", "--out", str(out), str(root)).stdout
    report = json.loads(run("status", "--json").stdout)
    assert report["partials"] == [] and report["partial_total"] == 0  # the old partial one is superseded
    with session_scope() as s:  # the old transcript stays in the database, for the record
        assert s.scalar(select(Transcript.warnings).where(Transcript.job_id == old_id)).startswith("audio ends at")


def test_check_unchanged_catches_a_file_changed_after_enqueue(db_url, shared_audio: Path, tmp_path: Path) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    clip = root / "clip.flac"
    shutil.copyfile(shared_audio / "en" / "librispeech_61-70968-0000.flac", clip)
    run("enqueue", "--no-dispatch", "--quiet", str(root))
    (job_id,) = jobs_by_name().values()

    def check() -> str | None:
        with session_scope() as s:
            return check_unchanged(job=s.get(Job, job_id))

    assert check() is None
    st = clip.stat()
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched: same content, hashed
    assert check() is None
    corrupt(clip, clip, 0.4, 0.5)  # same size, other bytes, new mtime
    assert clip.stat().st_size == st.st_size and check() == FILE_CHANGED
    shutil.copyfile(shared_audio / "en" / "librispeech_2412-153948-0000.flac", clip)  # other audio
    assert check() == "file changed since it was queued"

    with session_scope() as s:
        claim_job(session=s, job_id=job_id, worker_host="mac-mini-1", lease_s=60)
        assert fail_job(session=s, job_id=job_id, error=check_unchanged(job=s.get(Job, job_id)), retryable=False) == JobStatus.FAILED
    run("enqueue", "--no-dispatch", "--quiet", str(root))  # the new content gets its own job
    with session_scope() as s:
        jobs = list(s.scalars(select(Job).order_by(Job.id)))
        assert [(j.status, j.error) for j in jobs] == [(JobStatus.FAILED, FILE_CHANGED), (JobStatus.QUEUED, None)]
        new = jobs[1]
        assert check_unchanged(job=new) is None
        clip.unlink()
        assert check_unchanged(job=new) == FILE_GONE and "gone" in FILE_GONE
