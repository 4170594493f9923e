"""status, export, search, retry and the README's SQL, on rows written through finish_job."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text

from models.db import session_scope
from models.jobs import claim_job, fail_job, finish_job
from models.tables import Job, JobStatus
from cli import main
from tests.fixtures_db import db_url, make_transcript  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "tests" / "data" / "samples"

JFK = [
    (0.0, 4.2, "And so, my fellow Americans,"),
    (4.2, 8.0, "ask not what your country can do for you,"),
    (8.0, 11.0, "ask what you can do for your country."),
]
GERMAN = [(0.0, 3.0, "Die Würde des Menschen ist unantastbar."), (3.0, 6.0, "Größe und Straße, café.")]

# The README's three queries (copied there verbatim; test_readme_queries_are_these checks it).
SQL_WORD_WITH_SECOND = """
SELECT f.path, w.start_s, w.word
FROM words w
JOIN segments s ON s.id = w.segment_id
JOIN transcripts t ON t.id = s.transcript_id
JOIN jobs j ON j.id = t.job_id
JOIN files f ON f.sha256 = j.sha256
WHERE lower(w.word) LIKE '%country%'
ORDER BY f.path, w.start_s;
"""
SQL_HOURS_PER_LANGUAGE = """
SELECT t.language, count(*) AS files, round(CAST(sum(t.duration_s) / 3600.0 AS numeric), 2) AS hours
FROM transcripts t
GROUP BY t.language
ORDER BY hours DESC;
"""
SQL_SLOWEST = """
SELECT j.path, t.duration_s, t.wall_s, t.real_time_factor, t.device
FROM transcripts t
JOIN jobs j ON j.id = t.job_id
ORDER BY t.real_time_factor ASC
LIMIT 10;
"""
README_QUERIES = [SQL_WORD_WITH_SECOND, SQL_HOURS_PER_LANGUAGE, SQL_SLOWEST]


def run(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def archive(db_url, tmp_path: Path) -> Path:
    """The sample clips enqueued (plus a copy of jfk at a second path); jfk and one clip transcribed, one failed."""
    root = tmp_path / "archive"
    shutil.copytree(SAMPLES, root)
    shutil.copy2(root / "jfk.flac", root / "jfk copy.flac")
    run("enqueue", "--no-dispatch", "--quiet", str(root))
    with session_scope() as s:
        jobs = {Path(j.path).name: j.id for j in s.scalars(select(Job))}
    assert set(jobs) == {"jfk.flac", "librispeech_61-70968-0000.flac", "librispeech_1221-135766-0002.wav"} or \
        set(jobs) == {"jfk copy.flac", "librispeech_61-70968-0000.flac", "librispeech_1221-135766-0002.wav"}
    jfk_id = next(i for n, i in jobs.items() if n.startswith("jfk"))
    with session_scope() as s:
        claim_job(session=s, job_id=jfk_id, worker_host="mac-mini-1", lease_s=60)
        finish_job(session=s, job_id=jfk_id, transcript=make_transcript(JFK, wall_s=0.5))
        de = jobs["librispeech_61-70968-0000.flac"]  # pretend: German, for search and the per-language query
        claim_job(session=s, job_id=de, worker_host="linux-gpu", lease_s=60)
        finish_job(session=s, job_id=de, transcript=make_transcript(GERMAN, language="de", model="base", wall_s=2.0))
        bad = jobs["librispeech_1221-135766-0002.wav"]
        claim_job(session=s, job_id=bad, worker_host="linux-gpu", lease_s=60)
        fail_job(session=s, job_id=bad, error="cannot decode audio: invalid data found", retryable=False)
    return root


def test_status_counts_hours_failures_and_workers(archive):
    report = json.loads(run("status", "--json").stdout)
    assert report["counts"] == {"queued": 0, "running": 0, "done": 2, "failed": 1}
    assert report["audio_s_done"] == pytest.approx(11.0 + 6.0)
    assert report["done_last_hour"] == 2 and report["audio_s_last_hour"] == pytest.approx(17.0)
    assert report["failures"][0]["error"].startswith("cannot decode audio")
    hosts = {w["host"]: w for w in report["workers"]}
    assert hosts["mac-mini-1"]["done_last_hour"] == 1 and hosts["mac-mini-1"]["mean_real_time_factor"] == pytest.approx(22.0)
    out = run("status").stdout
    assert "done 2" in out and "failed 1" in out and "cannot decode audio" in out and "mac-mini-1" in out


def test_export_formats_and_both_paths_of_shared_content(archive, tmp_path):
    srt = run("export", "--format", "srt", str(archive / "jfk copy.flac")).stdout
    assert srt.startswith("1\n00:00:00,000 --> 00:00:04,200\nAnd so, my fellow Americans,")
    assert run("export", str(archive / "jfk.flac")).stdout.splitlines()[1] == "ask not what your country can do for you,"
    vtt = run("export", "-f", "vtt", str(archive / "jfk.flac")).stdout
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:04.200\n")
    tsv = run("export", "-f", "tsv", str(archive / "jfk.flac")).stdout.splitlines()
    assert tsv[0] == "start\tend\ttext" and tsv[2].startswith("4200\t8000\t")
    data = json.loads(run("export", "-f", "json", str(archive / "jfk.flac")).stdout)
    assert data["language"] == "en" and data["segments"][0]["words"][0]["word"].strip() == "And"

    result = CliRunner().invoke(main, ["export", str(archive)])  # two transcripts, no --out
    assert result.exit_code != 0 and "--out" in result.output
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", "-f", "srt", "--out", str(out), str(archive)])
    assert "wrote 2" in result.stdout  # the finished ones; the failed one is named with its reason, exit 1
    assert result.exit_code == 1 and "cannot decode audio" in result.stderr
    assert sorted(p.name for p in out.iterdir()) in (
        ["jfk.srt", "librispeech_61-70968-0000.srt"], ["jfk copy.srt", "librispeech_61-70968-0000.srt"])

    result = CliRunner().invoke(main, ["export", str(tmp_path / "never-enqueued.wav")])
    assert result.exit_code != 0 and "not in the database" in result.output


def test_search_words_phrases_punctuation_and_unicode(archive):
    hits = json.loads(run("search", "--json", "country").stdout)
    assert len(hits) == 2 and all(h["path"].endswith(".flac") for h in hits)
    assert {round(h["start_s"], 1) for h in hits} == {4.2, 8.0}
    assert len(json.loads(run("search", "--json", '"can do for your country"').stdout)) == 1
    assert len(json.loads(run("search", "--json", "country your").stdout)) == 2  # all words, any order
    assert json.loads(run("search", "--json", '"country your"').stdout) == []
    # FTS syntax and punctuation are just text, never an error
    for query in ['fellow AND "', "Americans*", "country)", "NEAR(ask not)", "-ask", "col:umn", "'", '"']:
        run("search", "--", query)
    assert len(json.loads(run("search", "--json", "WÜRDE").stdout)) == 1
    assert len(json.loads(run("search", "--json", "GRÖSSE straße").stdout)) == 0  # no ß -> ss folding
    assert len(json.loads(run("search", "--json", "größe STRASSE".replace("STRASSE", "Straße")).stdout)) == 1
    assert json.loads(run("search", "--json", "americans,").stdout)[0]["language"] == "en"
    assert "fellow Americans" in run("search", "fellow").stdout
    assert json.loads(run("search", "--json", "zebra").stdout) == []


def test_retry_requeues_failed_jobs(archive):
    assert "re-queued 1" in run("retry", "--no-dispatch").stdout
    with session_scope() as s:
        job = s.scalar(select(Job).where(Job.path.like("%1221-135766-0002.wav")))
        assert job.status == JobStatus.QUEUED and job.attempts == 0 and job.error is None
    assert "nothing to retry" in run("retry", "--no-dispatch").stdout
    # one 4.83 s job left and a rate measured on the jobs just done: an ETA (its arithmetic: test_scheduler_status.py)
    report = json.loads(run("status", "--json").stdout)
    assert report["counts"]["queued"] == 1 and report["eta_s"] is not None


def test_readme_queries_run_on_both_databases(archive):
    with session_scope() as s:
        mentions = s.execute(text(SQL_WORD_WITH_SECOND)).all()
        # both paths of the jfk content find the words, each with its second
        assert {Path(p).name for p, _, _ in mentions} == {"jfk.flac", "jfk copy.flac"}
        assert sorted({round(t, 2) for _, t, _ in mentions}) == [5.89, 10.62]  # "country" in the 2nd and 3rd segments
        per_language = {lang: (n, float(h)) for lang, n, h in s.execute(text(SQL_HOURS_PER_LANGUAGE))}
        assert per_language == {"en": (1, 0.0), "de": (1, 0.0)}
        slowest = s.execute(text(SQL_SLOWEST)).all()
        assert Path(slowest[0][0]).name.startswith("librispeech_61") and slowest[0][3] == pytest.approx(3.0)


def test_readme_queries_are_these():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", readme, re.S)
    for query in README_QUERIES:
        assert query.strip() in [b.strip() for b in blocks], f"README lacks this query:\n{query}"


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "archive-asr"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from cli import main; main()"]


def test_unreachable_database_is_one_line_and_db_upgrade_works_from_anywhere(data_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHIVE_ASR_")}
    env["ARCHIVE_ASR_DATA_DIR"] = str(data_dir)
    bad = subprocess.run([*_cli(), "status"], capture_output=True, text=True, cwd=tmp_path,
                         env={**env, "ARCHIVE_ASR_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/archive"})
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "cannot open the database" in bad.stderr
    invalid = subprocess.run([*_cli(), "status"], capture_output=True, text=True, cwd=tmp_path,
                             env={**env, "ARCHIVE_ASR_DATABASE_URL": "mysql://x"})
    assert invalid.returncode != 0 and "ARCHIVE_ASR_DATABASE_URL" in invalid.stderr and "Traceback" not in invalid.stderr

    up = subprocess.run([*_cli(), "db", "upgrade"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert up.returncode == 0, up.stderr
    assert "upgraded empty ->" in up.stdout and (data_dir / "archive.db").exists()
    again = subprocess.run([*_cli(), "db", "upgrade"], capture_output=True, text=True, cwd="/", env=env)
    assert again.returncode == 0 and "already at revision" in again.stdout


def test_scheduler_commands_never_import_mlx(tmp_path):
    code = (
        "import sys; from click.testing import CliRunner; from cli import main\n"
        "for args in (['enqueue', '--no-dispatch', '-q', sys.argv[1]], ['status'], ['search', 'x'], ['export']):\n"
        "    r = CliRunner().invoke(main, args); assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_whisper', 'engine')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHIVE_ASR_")}
    env["ARCHIVE_ASR_DATA_DIR"] = str(tmp_path / "data")
    out = subprocess.run([sys.executable, "-c", code, str(SAMPLES)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
