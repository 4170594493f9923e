"""engine.convert / model_store / holder: the bundled CTranslate2 models convert to working MLX folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine  # noqa: F401
from engine.audio import load_audio
from engine.convert import META_FILE, convert_ct2, ct2_to_mlx_weights, read_ct2_model
from engine.errors import ModelError
from engine.model_store import BUNDLED, bundled_sources, import_ct2, list_models, resolve_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ct2() -> tuple[list[Path], Path]:
    return bundled_sources(BUNDLED["tiny.en"])


@pytest.fixture(scope="module")
def tiny_variables(tiny_ct2):
    variables, aliases, sha256 = read_ct2_model(tiny_ct2[0])
    return variables, aliases, sha256


def test_pinned_sha256_matches_the_shipped_file(tiny_variables) -> None:
    assert tiny_variables[2] == BUNDLED["tiny.en"].sha256


def test_mapping_covers_every_weight(tiny_variables) -> None:
    variables, aliases, _ = tiny_variables
    weights, dims = ct2_to_mlx_weights(variables, aliases)
    assert (dims.n_vocab, dims.n_audio_layer, dims.n_text_head) == (51864, 4, 6)
    assert weights["encoder.conv1.weight"].shape == (384, 3, 80)  # (out, kernel, in) for MLX
    assert "encoder.blocks.0.attn.key.bias" not in weights  # Whisper's keys have no bias
    fused = variables["decoder/layer_0/self_attention/linear_0/weight"]
    np.testing.assert_array_equal(weights["decoder.blocks.0.attn.value.weight"], fused[2 * 384 :])


def test_missing_tensor_is_a_clear_error(tiny_variables) -> None:
    variables, aliases, _ = tiny_variables
    broken = {k: v for k, v in variables.items() if k != "decoder/layer_2/ffn/linear_1/weight"}
    with pytest.raises(ModelError, match="missing tensor decoder/layer_2/ffn/linear_1/weight"):
        ct2_to_mlx_weights(broken, aliases)


def test_misshapen_or_extra_tensor_is_a_clear_error(tiny_variables) -> None:
    variables, aliases, _ = tiny_variables
    misshapen = dict(variables)
    misshapen["encoder/layer_1/ffn/linear_0/weight"] = np.zeros((1000, 384), np.float16)
    with pytest.raises(ModelError, match=r"encoder.blocks.1.mlp1.weight is \(1000, 384\)"):
        ct2_to_mlx_weights(misshapen, aliases)
    extra = dict(variables) | {"decoder/layer_0/ffn/linear_9/weight": np.zeros(3, np.float16)}
    with pytest.raises(ModelError, match="unexpected tensors"):
        ct2_to_mlx_weights(extra, aliases)


def test_truncated_model_bin_is_a_clear_error(tiny_ct2, tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "ct2"
    folder.mkdir()
    (folder / "model.bin").write_bytes(tiny_ct2[0][0].read_bytes()[:5_000_000])
    with pytest.raises(ModelError, match="ends early"):
        import_ct2(folder, "truncated")
    assert not (data_dir / "models" / "truncated").exists()


def test_sha256_mismatch_refuses_to_convert(tiny_ct2, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not match the pinned"):
        convert_ct2(tiny_ct2[0], tmp_path / "m", name="x", config_path=None, expected_sha256="0" * 64)
    assert not (tmp_path / "m").exists()


def test_not_a_model(tmp_path: Path, data_dir: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00" + b"\x0c\x00TransformerSpec"[:14])
    with pytest.raises(ModelError):
        import_ct2(tmp_path, "junk")
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")


def test_hugging_face_offline_is_a_clear_error(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached copy to fall back on
    with pytest.raises(ModelError, match="cannot download 'mlx-community/whisper-tiny'.*bundled model"):
        resolve_model("mlx-community/whisper-tiny")


@pytest.mark.slow
def test_bundled_tiny_loads_and_transcribes_with_mlx_whisper(data_dir: Path, shared_audio: Path) -> None:
    import mlx.core as mx
    import mlx_whisper

    from engine.holder import get_model

    loaded = get_model("tiny.en")
    assert loaded.name == "tiny.en" and not loaded.is_multilingual and loaded.dtype == mx.float32
    config = json.loads(bundled_sources(BUNDLED["tiny.en"])[1].read_text())
    assert loaded.alignment_heads.tolist() == config["alignment_heads"]
    assert get_model("tiny.en") is loaded  # one per process
    meta = json.loads((loaded.path / META_FILE).read_text())
    assert meta["source_sha256"] == BUNDLED["tiny.en"].sha256
    # The converted folder is mlx-whisper's own format: its loader and decoder understand it.
    result = mlx_whisper.transcribe(load_audio(shared_audio / "en" / "jfk.flac"), path_or_hf_repo=str(loaded.path), fp16=False)
    assert "ask not what your country can do for you" in result["text"].lower()
    assert any(m.name == "tiny.en" and m.ready for m in list_models())


@pytest.mark.slow
def test_bundled_base_is_multilingual_and_hears_german(data_dir: Path, shared_audio: Path) -> None:
    import mlx.core as mx
    from mlx_whisper.audio import log_mel_spectrogram, pad_or_trim

    from engine.holder import get_model, release_model

    try:
        loaded = get_model("base")
        assert loaded.is_multilingual and loaded.num_languages == 99 and loaded.dims.n_text_layer == 6
        assert loaded.tokenizer(language="de").sot_sequence == (50258, 50261, 50359)
        audio = mx.array(load_audio(shared_audio / "multi" / "leopard_test_de.wav"))
        mel = pad_or_trim(log_mel_spectrogram(audio), 3000, axis=0)  # (3000 frames, 80 mels)
        _, probs = loaded.model.detect_language(mel[None].astype(mx.float32))
        assert max(probs[0], key=probs[0].get) == "de"
    finally:
        release_model()


@pytest.mark.slow
def test_two_processes_converting_at_once_do_not_clash(tiny_ct2, tmp_path: Path) -> None:
    parts, config = tiny_ct2
    script = (
        "import sys; from pathlib import Path; import engine; from engine.convert import convert_ct2;"
        f"convert_ct2([Path({str(parts[0])!r})], Path(sys.argv[1]), name='t', config_path=Path({str(config)!r}));"
        "print('ok')"
    )
    dest = tmp_path / "models" / "t"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(dest)], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.communicate(timeout=300)[0].strip() for p in procs] == ["ok", "ok"]
    assert sorted(p.name for p in dest.iterdir()) == ["archive_asr.json", "config.json", "weights.safetensors"]
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".t.") and p.is_dir()] == []


@pytest.mark.slow
def test_models_cli_imports_and_lists_a_ct2_folder(tiny_ct2, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from archive_asr.settings import get_settings
    from cli import main

    monkeypatch.setenv("ARCHIVE_ASR_MODELS_DIR", str(tmp_path / "models"))
    get_settings.cache_clear()
    runner = CliRunner()
    result = runner.invoke(main, ["models", "import", str(tiny_ct2[0][0].parent), "--name", "my-tiny"])
    assert result.exit_code == 0, result.output
    listed = json.loads(runner.invoke(main, ["models", "list", "--json"]).output)
    mine = next(m for m in listed if m["name"] == "my-tiny")
    assert mine["ready"] and mine["multilingual"] is False and mine["kind"] == "imported"
    again = runner.invoke(main, ["models", "import", str(tmp_path), "--name", "x"])
    assert again.exit_code != 0 and "no model.bin" in again.output
