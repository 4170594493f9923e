"""`archive-asr transcribe`: the engine straight from the command line, one bad file failing alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main


@pytest.mark.slow
def test_transcribe_json_and_a_bad_file(data_dir: Path, shared_audio: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notes.mp3"
    bad.write_text("not audio at all")
    result = CliRunner().invoke(
        main, ["transcribe", str(shared_audio / "en" / "jfk.flac"), str(bad), "--model", "tiny.en", "--json", "-q"]
    )
    assert result.exit_code == 1  # one file failed; the other was still transcribed
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    good, failed = lines
    assert "ask not what your country can do for you" in good["text"].lower()
    assert good["timing"]["model"] and good["timing"]["batch_size"] >= 1
    words = [w for s in good["segments"] for w in s["words"]]
    assert words and all(w["start_s"] <= w["end_s"] for w in words)
    assert failed["path"] == str(bad) and "not an audio file" in failed["error"]


def test_transcribe_rejects_a_bad_batch_size(data_dir: Path, shared_audio: Path) -> None:
    result = CliRunner().invoke(main, ["transcribe", str(shared_audio / "en" / "jfk.flac"), "--batch-size", "0"])
    assert result.exit_code == 2 and "positive number" in result.output
