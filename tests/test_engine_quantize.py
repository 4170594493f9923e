"""`archive-asr models quantize`: quantised models are written atomically, listed, loaded at their
real size, transcribed through the batched engine, and a worker that cannot fit says what would."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from tests.fixtures_engine_words import isolated_settings

REPO = Path(__file__).resolve().parents[1]
JFK = "ask not what your country can do for you"


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """The shared test model cache, with tiny.en quantised to 8 and 4 bits in it (kept between runs)."""
    with isolated_settings(tmp_path_factory.mktemp("quantize")):
        from engine.quantize import Quantization, quantize_model

        for bits in (8, 4):
            quantize_model("tiny.en", Quantization(bits))
        yield REPO / ".data" / "test-models"
        from engine.holder import release_model

        release_model()


@pytest.fixture
def own_models_dir(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty models folder holding only a converted tiny.en (copied from the shared cache)."""
    from archive_asr.settings import get_settings
    from engine.model_store import resolve_model

    source = resolve_model("tiny.en")
    models = tmp_path / "models"
    shutil.copytree(source, models / "tiny.en")
    monkeypatch.setenv("ARCHIVE_ASR_MODELS_DIR", str(models))
    get_settings.cache_clear()
    return models


def test_quantize_writes_lists_and_refuses_mistakes(own_models_dir: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["models", "quantize", "tiny.en", "--bits", "4"])
    assert result.exit_code == 0, result.output
    assert "tiny.en-q4" in result.output
    dest = own_models_dir / "tiny.en-q4"
    config = json.loads((dest / "config.json").read_text())
    meta = json.loads((dest / "archive_asr.json").read_text())
    source_meta = json.loads((own_models_dir / "tiny.en" / "archive_asr.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4}
    assert meta["source_model"] == "tiny.en" and meta["quantization"] == {"group_size": 64, "bits": 4}
    assert meta["source_sha256"] == source_meta["source_sha256"]
    assert meta["alignment_heads"] == source_meta["alignment_heads"]
    # atomic: no temporary folder is left beside it
    assert sorted(p.name for p in own_models_dir.iterdir() if p.is_dir()) == ["tiny.en", "tiny.en-q4"]

    again = runner.invoke(main, ["models", "quantize", "tiny.en", "--bits", "4"])
    assert again.exit_code == 0 and "already there" in again.output

    listed = {m["name"]: m for m in json.loads(runner.invoke(main, ["models", "list", "--json"]).output)}
    assert listed["tiny.en"]["bits"] == 16 and listed["tiny.en-q4"]["bits"] == 4
    assert listed["tiny.en-q4"]["kind"] == "quantized"
    # 4 bits and a float16 scale and bias per 64 weights: about 0.28 of float16
    assert 0.2 < listed["tiny.en-q4"]["size_bytes"] / listed["tiny.en"]["size_bytes"] < 0.36
    table = runner.invoke(main, ["models", "list"]).output
    assert re.search(r"tiny\.en-q4\s+quantized\s+English\s+4\s+\d+ MiB", table)

    twice = runner.invoke(main, ["models", "quantize", "tiny.en-q4", "--bits", "8"])
    assert twice.exit_code == 1 and "already quantised" in twice.output and "tiny.en" in twice.output
    assert runner.invoke(main, ["models", "quantize", "tiny.en", "--bits", "3"]).exit_code == 2


def test_the_encoder_may_have_a_group_size_of_its_own(own_models_dir: Path, shared_audio: Path) -> None:
    import mlx.core as mx

    from engine.errors import ModelError
    from engine.holder import get_model, load_mlx_folder, release_model
    from engine.memory import weights_bytes
    from engine.options import EngineOptions
    from engine.transcribe import transcribe_file

    result = CliRunner().invoke(main, ["models", "quantize", "tiny.en", "--bits", "8", "--encoder-group-size", "32"])
    assert result.exit_code == 0, result.output
    dest = own_models_dir / "tiny.en-q8-e32"
    config = json.loads((dest / "config.json").read_text())["quantization"]
    assert json.loads((dest / "archive_asr.json").read_text())["quantization"] == {"group_size": 64, "bits": 8, "encoder_group_size": 32}
    own = {path: entry for path, entry in config.items() if isinstance(entry, dict)}
    assert own and all(path.startswith("encoder.") and entry == {"group_size": 32, "bits": 8} for path, entry in own.items())
    assert len(own) == 4 * 6  # tiny.en's 4 encoder blocks: query, key, value, out, mlp1, mlp2

    release_model()
    gc.collect()
    before = mx.get_active_memory()
    loaded = get_model("tiny.en-q8-e32")
    assert loaded.model.encoder.blocks[0].mlp1.group_size == 32
    assert loaded.model.decoder.blocks[0].mlp1.group_size == 64 and loaded.model.decoder.token_embedding.group_size == 64
    planned = weights_bytes(loaded.dims, loaded.dtype.size, loaded.quantization)
    assert planned == pytest.approx(mx.get_active_memory() - before, rel=0.05)
    uniform = weights_bytes(loaded.dims, loaded.dtype.size, {"bits": 8, "group_size": 64})
    assert uniform < planned < weights_bytes(loaded.dims, loaded.dtype.size, {"bits": 8, "group_size": 32})
    t = transcribe_file(shared_audio / "en" / "jfk.flac", model_name="tiny.en-q8-e32", options=EngineOptions())
    assert JFK in _words(t.text)
    release_model()

    # a config that does not say which layers have their own groups: refused by name, not garbage
    (dest / "config.json").write_text(json.dumps(json.loads((dest / "config.json").read_text())
                                                 | {"quantization": {"group_size": 64, "bits": 8}}))
    with pytest.raises(ModelError, match=r"encoder\.blocks\.0\.\S+ is \(384, 12\), its config says \(384, 6\)"):
        load_mlx_folder(dest, mx.float32)


def test_quantised_weights_take_their_planned_size_and_free_rows(shared_cache: Path) -> None:
    import mlx.core as mx

    from engine.holder import get_model, release_model
    from engine.memory import plan_batch, weights_bytes

    measured = {}
    for name in ("tiny.en", "tiny.en-q8", "tiny.en-q4"):
        release_model()
        gc.collect()
        before = mx.get_active_memory()
        loaded = get_model(name)
        measured[name] = mx.get_active_memory() - before
        planned = weights_bytes(loaded.dims, loaded.dtype.size, loaded.quantization)
        assert planned == pytest.approx(measured[name], rel=0.05), name
        del loaded
    assert measured["tiny.en-q4"] < measured["tiny.en-q8"] < 0.55 * measured["tiny.en"]
    release_model()


def test_freed_weight_memory_becomes_rows() -> None:
    import mlx.core as mx
    from mlx_whisper.whisper import ModelDimensions

    from engine.memory import plan_batch, weights_bytes

    # large-v3-turbo's shapes in float16: 4 bits free about 1.1 GiB, several rows' worth
    turbo = ModelDimensions(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
                            n_vocab=51866, n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=4)
    full = plan_batch(turbo, mx.float16, budget_bytes=1, max_batch=1000)
    budget = full.weights_bytes + 2 * full.per_window_bytes
    rows = {bits: plan_batch(turbo, mx.float16, budget_bytes=budget, max_batch=1000,
                             quantization=bits and {"bits": bits, "group_size": 64}).batch_size for bits in (0, 8, 4)}
    assert rows[0] == 2 < rows[8] < rows[4]
    freed = full.weights_bytes - weights_bytes(turbo, 2, {"bits": 4, "group_size": 64})
    assert rows[4] == 2 + freed // full.per_window_bytes


@pytest.mark.slow
# 4-bit tiny.en stops after "... can do for you" (mlx_whisper.transcribe does too with these
# weights): the words it gives must still be right and timed; the full 22 at 8 bits.
@pytest.mark.parametrize("name, min_words", [("tiny.en-q8", 20), ("tiny.en-q4", 12)])
def test_quantised_model_transcribes_with_words(shared_cache: Path, shared_audio: Path, name: str, min_words: int) -> None:
    from engine.options import EngineOptions
    from engine.transcribe import transcribe_file

    t = transcribe_file(shared_audio / "en" / "jfk.flac", model_name=name, options=EngineOptions())
    text = _words(t.text)
    assert "my fellow americans" in text and JFK in text
    assert t.language == "en" and t.timing.model == name
    words = [w for s in t.segments for w in s.words]
    assert len(words) >= min_words
    assert "country" in [re.sub(r"\W", "", w.word.lower()) for w in words]
    for s in t.segments:
        for w in s.words:
            assert s.start_s <= w.start_s <= w.end_s <= s.end_s


@pytest.mark.slow
def test_quantised_model_falls_back_hotter(shared_cache: Path, shared_audio: Path) -> None:
    from engine.options import EngineOptions
    from engine.transcribe import transcribe_file

    # every window "unsure" (no log-probability is above 0): each is decoded again at 0.2
    options = EngineOptions(logprob_threshold=0.0, temperatures=(0.0, 0.2), word_timestamps=False)
    t = transcribe_file(shared_audio / "en" / "jfk.flac", model_name="tiny.en-q8", options=options)
    assert t.segments and all(s.temperature == 0.2 for s in t.segments)
    assert "country" in _words(t.text)


@pytest.mark.slow
def test_quantised_multilingual_model_detects_languages(shared_cache: Path, shared_audio: Path) -> None:
    import mlx.core as mx
    from mlx_whisper.audio import N_FRAMES

    from engine.audio import load_audio
    from engine.holder import get_model
    from engine.language import pick_language, window_languages
    from engine.mel import file_mel
    from engine.quantize import Quantization, quantize_model

    quantize_model("base", Quantization(4))
    loaded = get_model("base-q4")
    clips = [shared_audio / "multi" / "leopard_test_de.wav", shared_audio / "multi" / "leopard_test_fr.wav",
             shared_audio / "en" / "jfk.flac"]
    mel = mx.stack([mx.array(file_mel([load_audio(c)], loaded.dims.n_mels).window(0, N_FRAMES)[0]) for c in clips])
    windows = window_languages(loaded, loaded.model.encoder(mel.astype(loaded.dtype)))
    assert [pick_language([w], is_multilingual=True)[0] for w in windows] == ["de", "fr", "en"]


def _worker(env: dict, model: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "worker", "--model", model], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_worker_that_cannot_fit_names_a_quantised_model_that_would(own_models_dir: Path, data_dir: Path) -> None:
    from engine.holder import default_dtype, read_config
    from engine.memory import per_window_bytes, weights_bytes

    dims, _ = read_config(own_models_dir / "tiny.en")
    dtype_bytes = default_dtype().size
    row = per_window_bytes(dims, dtype_bytes)
    full = weights_bytes(dims, dtype_bytes) + row
    q8 = weights_bytes(dims, dtype_bytes, {"bits": 8, "group_size": 64}) + row
    budget_mib = (full + q8) // 2 // (1 << 20)  # q8 fits, full precision does not
    env = dict(os.environ, ARCHIVE_ASR_MEMORY_BUDGET=f"{budget_mib}MiB")

    refused = _worker(env, "tiny.en")
    assert refused.returncode != 0
    [line] = refused.stderr.strip().splitlines()  # one line, no traceback
    assert f"model tiny.en needs {full / (1 << 30):.2f} GiB for its weights and one batch row" in line
    assert f"the budget is {budget_mib / 1024:.2f} GiB (ARCHIVE_ASR_MEMORY_BUDGET={budget_mib}MiB)" in line
    assert line.endswith("tiny.en-q8 would fit ({:.2f} GiB): archive-asr models quantize tiny.en --bits 8".format(q8 / (1 << 30)))

    # a budget below even 4 bits: says so, and names no variant as fitting
    tiny = _worker(dict(env, ARCHIVE_ASR_MEMORY_BUDGET="64MiB"), "tiny.en")
    assert tiny.returncode != 0 and "even tiny.en-q4 would need" in tiny.stderr and "would fit" not in tiny.stderr


def test_cpu_layers_give_what_mlx_quantised_layers_give() -> None:
    import mlx.core as mx
    import mlx.nn as nn

    from engine.cpu_quantized import VOCAB_SLICE_ROWS, unpack, use_cpu_layers

    for bits in (8, 4):
        mx.random.seed(0)
        model = nn.Sequential(nn.Linear(128, 256), nn.Embedding(VOCAB_SLICE_ROWS + 100, 128))  # two vocabulary slices
        nn.quantize(model, group_size=64, bits=bits)
        linear, embedding = model.layers
        assert mx.array_equal(unpack(linear), mx.dequantize(linear.weight, linear.scales, linear.biases, bits=bits)).item()
        few, many = mx.random.normal((2, 8, 128)), mx.random.normal((3, 50, 128))  # sliced, then whole
        reference = [linear(many), embedding.as_linear(few), embedding.as_linear(many)]
        assert use_cpu_layers(model) == 2
        ours = [linear(many), embedding.as_linear(few), embedding.as_linear(many)]
        for a, b in zip(reference, ours):
            assert a.shape == b.shape
            assert mx.allclose(a, b, atol=1e-3, rtol=1e-3).item(), bits
